"""A DataLoader whose place inside an epoch survives a checkpoint.

Lightning saves the `state_dict()` of any train loader that has one and hands it back on resume, so a run
stopped mid-epoch (preemption, a crash) continues with exactly the batches it had not seen yet. The
shuffle order depends only on (seed, epoch), and the loader has its own generator, so data loading never
draws from the global RNG that the model's own randomness uses. Data sets with random augmentations get
each item's own seed from the sampler (`item_seeds=True`), fixed by (seed, epoch, item): a resumed run and
any number of loader processes augment exactly as an uninterrupted single-process run does.
"""

from collections.abc import Iterator, Sequence, Sized
from typing import Any, get_args

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainer.config.ranges import Partition
from trainer.data.evaluation import rank_and_world
from trainer.errors import UserError
from trainer.lightning_internals import training_loaders


class ShardedSampler(Sampler[int]):
    """Seeded per-epoch permutation, split evenly across distributed ranks (every rank gets the same count;
    the last size % world items of an epoch's order are left for later epochs). For training; validation
    shares out every item (trainer/data/evaluation.py).

    With `classes` (one class id per item; `data.partition=by_class`), each rank draws only from the items of
    its own classes (the i-th class in sorted order goes to rank i % world): the non-IID split of federated
    learning studies. Every rank still gets the same count, the smallest rank's share.

    With `item_seeds`, it yields (index, seed of this item's draws in this epoch) for data sets that augment.
    """

    def __init__(self, size: int, seed: int, classes: Sequence[int] | None = None, item_seeds: bool = False):
        self.size, self.seed, self.item_seeds = size, seed, item_seeds
        self.classes = None if classes is None else torch.as_tensor(classes)
        self.epoch = 0
        self.start = 0  # indices of this rank's shard to skip, set when resuming mid-epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        world = rank_and_world()[1]
        if self.classes is None:
            return self.size // world
        return min(int((self._owners(world) == rank).sum()) for rank in range(world))

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        rank, world = rank_and_world()
        if self.classes is None:
            shard = order[rank : len(self) * world : world]
        else:
            shard = order[self._owners(world)[order] == rank][: len(self)]
        start, self.start = self.start, 0
        items = shard[start:].tolist()
        if self.item_seeds:
            return iter([(index, item_seed(self.seed, self.epoch, index)) for index in items])
        return iter(items)

    def _owners(self, world: int) -> torch.Tensor:
        """The rank each item belongs to under the by-class split."""
        assert self.classes is not None
        kinds, class_index = torch.unique(self.classes, sorted=True, return_inverse=True)
        if len(kinds) < world:
            raise UserError(
                f"data.partition=by_class: {len(kinds)} classes cannot be split over {world} workers: "
                "use fewer workers or data.partition=iid"
            )
        return class_index % world


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one item's augmentations in one epoch."""
    words = [seed % 2**64, epoch, index]  # SeedSequence takes non-negative words only
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


PARTITIONS = get_args(Partition)


def partition_classes(partition: str, classes: Sequence[int] | None) -> Sequence[int] | None:
    """What the training sampler splits by: nothing (`iid`) or each item's class (`by_class`)."""
    if partition not in PARTITIONS:
        raise UserError(f"data.partition={partition} is not one of {', '.join(PARTITIONS)}")
    if partition == "iid":
        return None
    if classes is None:
        raise UserError(
            "data.partition=by_class needs a class per item, and this data source has none "
            "(data=hub: set data.label_key; data=image_folder: one subfolder per class)"
        )
    return classes


class ResumableLoader(DataLoader):
    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        sampler: Any = None,
        classes: Sequence[int] | None = None,
        item_seeds: bool = False,
        **kwargs: Any,
    ):
        assert isinstance(dataset, Sized)
        kwargs.pop("generator", None)
        if sampler is None:  # Lightning passes its own when it rebuilds the loader (trainer.overfit_batches)
            sampler = ShardedSampler(len(dataset), seed, classes, item_seeds)
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            generator=torch.Generator().manual_seed(seed),
            **kwargs,
        )
        self._batches_yielded = 0
        self._resume_at = 0

    def __iter__(self) -> Iterator[Any]:
        resume_at, self._resume_at = self._resume_at, 0
        if isinstance(self.sampler, ShardedSampler):
            assert self.batch_size is not None  # (always given)
            self.sampler.start = resume_at * self.batch_size
        self._batches_yielded = resume_at
        for batch in super().__iter__():
            self._batches_yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": getattr(self.sampler, "epoch", 0), "batches_yielded": self._batches_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.sampler, ShardedSampler) and state["batches_yielded"] < len(self):
            self.sampler.set_epoch(state["epoch"])
            self._resume_at = state["batches_yielded"]

    def end_epochs_at(self, batches: float) -> None:
        """Lightning draws only `batches` an epoch (`trainer.limit_train_batches`): a saved place at or past
        that is the end of an epoch, and the next epoch starts at its beginning."""
        if self._resume_at >= batches:
            self._resume_at = 0


class LoaderPosition(L.Callback):
    """Hands the checkpoint's place in the epoch to the training loader, as Lightning 2.6 does not always:

    - a task that reads `trainer.estimated_stepping_batches` in `configure_optimizers` (OneCycleLR's length)
      sets up the data before the checkpoint is restored, and the saved place is then never loaded
      (Lightning-AI/pytorch-lightning#20550): the resumed epoch would redo its first batches;
    - under `trainer.limit_train_batches` an epoch ends before the loader does, and a checkpoint written at
      that end looks mid-epoch to the loader: the next epoch would skip its first batches.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for loader in training_loaders(trainer):
            if isinstance(loader, ResumableLoader):
                loader.end_epochs_at(trainer.num_training_batches)
