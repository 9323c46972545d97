"""A task written outside the package: a small network that classifies scikit-learn's 8x8 digits.

Everything `trainer` needs is here and in ./conf: a data module, a network, and a task that subclasses
`trainer.Task`, reports its loss (what the divergence guard watches) and declares the metrics its validation
logs. The annotations from `trainer` (`Positive`, ...) are the ranges the config check holds values to before
anything runs. Everything comes from `from trainer import ...`, the package's stable API. Run it from this
folder (the module must be importable; here, from the working directory):

    trainer hydra.searchpath=[file://$PWD/conf] +exp=digit_classifier
"""

from typing import Annotated, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainer import (
    FractionBelowOne,
    Interval,
    Positive,
    PositiveFloat,
    ResumableLoader,
    Seed,
    StepReport,
    Task,
    evaluation_loader,
)


class DigitVectors(L.LightningDataModule):
    """The 1,797 digits as vectors of 64 grey levels in [0, 1], split once by `seed`."""

    def __init__(
        self,
        batch_size: Positive = 64,
        val_fraction: Annotated[float, Interval(0, 1, low_open=True, high_open=True)] = 0.2,  # (0, 1)
        seed: Seed = 0,
    ):
        super().__init__()
        self.batch_size, self.val_fraction, self.seed = batch_size, val_fraction, seed

    def setup(self, stage: str) -> None:
        digits = load_digits()
        inputs, labels = torch.tensor(digits.data / 16, dtype=torch.float32), torch.tensor(digits.target)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        val, train = (
            order[: int(self.val_fraction * len(order))],
            order[int(self.val_fraction * len(order)) :],
        )
        self.train_set = TensorDataset(inputs[train], labels[train])
        self.val_set = TensorDataset(inputs[val], labels[val])

    def train_dataloader(self) -> ResumableLoader:
        # trainer's loader: each data-parallel worker gets its own share, and a resumed run its place
        return ResumableLoader(self.train_set, self.batch_size, seed=self.seed, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        # this worker's share of the validation set, drawing nothing from the training's random numbers
        return evaluation_loader(self.val_set, batch_size=len(self.val_set))


class MLP(nn.Sequential):
    def __init__(self, hidden: Positive = 64, classes: Positive = 10):
        super().__init__(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class DigitClassifier(Task):
    validation_metrics: ClassVar[dict[str, str]] = {
        "val/accuracy": "max"
    }  # what it logs, and which way is better

    def __init__(
        self, network: nn.Module, lr: PositiveFloat = 1e-3, momentum: FractionBelowOne | None = None
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["network"])
        self.network = network

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam; with a `momentum`, SGD with momentum."""
        if self.hparams.momentum is None:
            return torch.optim.Adam(self.network.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.network.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        loss = F.cross_entropy(self.network(inputs), labels)
        self.report(StepReport(losses={"loss": loss}))  # for the guard, and train/loss in the loggers
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        accuracy = (self.network(inputs).argmax(1) == labels).float().mean()
        self.log("val/accuracy", accuracy, sync_dist=True)  # (the mean of the workers' shares)
