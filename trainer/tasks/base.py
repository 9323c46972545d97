"""The contract between a task and the divergence guard (also read by `mode=lr_find` and `trainer.replay`).

A task subclasses `Task` and ends its training step with `self.report(StepReport(losses=..., signals=...))`:
- `losses` are what the step minimises, positive: the guard watches each for NaN/Inf, spikes and a rising
  level, the LR finder follows their sum, the replay prints them;
- `signals` are other numbers of the step (a total, a KL, a clip fraction): logged and checked for NaN/Inf.
Subclasses of `StepReport` carry what only some tasks know, and the guard's collapse detector reads them:
`GANReport` (a GAN's discriminator outputs), `PolicyReport` (a policy's entropy and how far an update
moved it), `ValueReport` (Q-values and the largest possible return).
A step that makes its own data (RL plays in its environments) names it with `self.train_on(data)` before it
updates: a divergence bundle keeps that data, and a replay hands it back to `training_step` as the batch.
Other steps train on the loader's batch, which the guard keeps itself. A validation may end with
`self.report_validation(...)`: a generative task's sample diversity, watched for mode collapse.

A plain LightningModule with automatic optimization works too: its returned loss is its one loss.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection

from trainer.errors import UserError
from trainer.fsdp import clip_grad_norm_over_shards, is_sharded
from trainer.loggers import is_logging_step

Tensors = dict[str, torch.Tensor]


@dataclass
class StepReport:
    losses: Tensors
    signals: Tensors = field(default_factory=dict)

    def detached(self) -> "StepReport":
        return replace(
            self,
            **{
                f.name: apply_to_collection(getattr(self, f.name), torch.Tensor, torch.Tensor.detach)
                for f in fields(self)
            },
        )

    def describe(self) -> dict[str, Any]:
        """What the report is, without its numbers: its type, the names of its losses, its constants."""
        constants = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), (int, float)) or getattr(self, f.name) is None
        }
        return {"type": type(self).__name__, "losses": list(self.losses), "constants": constants}

    def scalars(self) -> Tensors:
        """Every number of the report by name: the losses, the signals, and the fields of subclasses."""
        named = {f.name: getattr(self, f.name) for f in fields(self)}
        return {
            **self.losses,
            **self.signals,
            **{k: v for k, v in named.items() if isinstance(v, torch.Tensor)},
        }


@dataclass
class GANReport(StepReport):
    """A GAN's step: also the discriminator's mean probability of "real" on real images, D(x), and on
    generated ones, D(G(z)), as the DCGAN paper names them."""

    D_x: torch.Tensor | None = None
    D_G_z: torch.Tensor | None = None


@dataclass
class PolicyReport(StepReport):
    """A policy-gradient step: also the policy's mean entropy, the largest entropy a policy over these
    actions can have (log of their number; None for continuous actions, whose entropy has no maximum), and
    the mean approximate KL divergence of the updated policy from the one that collected the data."""

    entropy: torch.Tensor | None = None
    max_entropy: float | None = None
    approx_kl: torch.Tensor | None = None


@dataclass
class ValueReport(StepReport):
    """A value-learning step (DQN): also the mean Q-value of the batch, and the largest return the rewards
    seen so far allow, max |r| / (1 - gamma) (None for gamma = 1). No correct Q-value exceeds it."""

    q_values: torch.Tensor | None = None
    max_return: float | None = None


@dataclass
class ValidationReport:
    """What a validation tells the guard. A generative task reports the diversity of its samples relative to
    the data's (1: as diverse as the data), whose fall is mode collapse."""

    sample_diversity: float | None = None


class Task(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.step_report: StepReport | None = None
        self.step_data: Any = None  # what this step trains on when it is not the loader's batch
        self.validation_report: ValidationReport | None = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.step_report = self.step_data = None  # a step that reports nothing must not show the last one's

    def on_train_start(self) -> None:
        # A resumed schedule keeps the length it was planned for (OneCycleLR's total_steps): a run resumed
        # with a larger max_epochs or max_steps would crash when the schedule ends.
        wanted = self.trainer.estimated_stepping_batches
        for config in self.trainer.lr_scheduler_configs:
            planned = getattr(config.scheduler, "total_steps", None)
            if isinstance(planned, int) and wanted > planned:
                raise UserError(
                    f"the checkpoint's learning-rate schedule ({type(config.scheduler).__name__}) ends at "
                    f"step {planned} and this run asks for {int(wanted)}: resume with the first run's "
                    "trainer.max_epochs and trainer.max_steps, or start a new run (resume=never)"
                )

    def train_on(self, data: Any) -> None:
        self.step_data = data

    def report(self, report: StepReport) -> None:
        """The step's numbers for the guard; on logging steps also to the loggers as train/<name>."""
        self.step_report = report.detached()
        if is_logging_step(self.trainer):
            self.log_report(self.step_report)

    def log_report(self, report: StepReport) -> None:
        self.log_dict({f"train/{k}": v for k, v in report.scalars().items()})

    def report_validation(self, report: ValidationReport) -> None:
        self.validation_report = report

    def progress(self) -> tuple[int, int, str] | None:
        """(done, total, unit) when a run is not measured in epochs of batches (RL: env steps); the
        progress bar shows it instead."""
        return None

    def clip_gradients(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Lightning's FSDP precision refuses norm clipping: the norm of sharded gradients spans the ranks.
        by_norm = gradient_clip_algorithm in (None, "norm")
        if gradient_clip_val and by_norm and is_sharded(self.trainer.strategy):
            clip_grad_norm_over_shards(self.trainer, optimizer, gradient_clip_val)
        else:
            super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @property
    def fused_optimizer(self) -> bool:
        """Whether Adam/AdamW can run as one fused kernel over all parameters here (CPU and CUDA): a third of
        the default's time per update for small RL networks, 13% of a CPU step for MiniLM
        (scripts/bench_qa.py)."""
        return self.device.type in ("cpu", "cuda")


def stepwise(
    optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler
) -> dict[str, Any]:
    """`configure_optimizers`' answer for a learning-rate schedule stepped after every optimizer step."""
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def step_report(module: L.LightningModule, outputs: Any) -> StepReport | None:
    """What the step that just ran reports: a Task's report, else the loss a training_step returned."""
    if isinstance(module, Task):
        return module.step_report
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return StepReport({"loss": loss.detach()}) if isinstance(loss, torch.Tensor) else None


def step_data(module: L.LightningModule, batch: Any) -> Any:
    """The data the step trained on: a Task's own (RL), else the loader's batch."""
    own = module.step_data if isinstance(module, Task) else None
    return batch if own is None else own
