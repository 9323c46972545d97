"""Validation under several ranks: each rank scores an equal share of the items, every item counts once.

Equal shares keep the ranks' forward passes in step (a sharded model gathers its parameters in every
forward, and a rank with one batch more would wait forever); the last ranks' shares repeat items to get
there. Each result is keyed by its item (an index, an image id, a seed), and `gather_by_key` keeps one
result per key, so a score is the same whatever the world size.
"""

from collections.abc import Hashable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_share(indices: Sequence[int]) -> list[int]:
    """This rank's share of `indices`: every rank gets the same count, ceil(n / world); to get there the
    last ranks repeat the first items."""
    rank, world = rank_and_world()
    indices = list(indices)
    per_rank = -(-len(indices) // world)
    share = indices[rank::world]
    return share + indices[: per_rank - len(share)]


class Indexed(Dataset):
    """(index, item) pairs, for results that must be keyed by the item they came from."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


def evaluation_loader(
    dataset: Dataset, batch_size: int, order: Sequence[int] | None = None, **kwargs: Any
) -> DataLoader:
    """A loader over this rank's share of `dataset`, in `order` (default: as stored). It has its own
    generator: a DataLoader without one draws a seed from the global RNG each time it is iterated, and a
    validation within an epoch would then shift the random numbers of the training steps after it."""
    order = range(len(dataset)) if order is None else order  # type: ignore[arg-type]
    subset = Subset(dataset, rank_share(order))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, generator=torch.Generator(), **kwargs)


def gather_by_key(results: dict[K, V]) -> dict[K, V]:
    """Every rank's results in one dict on every rank, one per key (the repeats of `rank_share` dropped).
    Values travel pickled: move tensors to the CPU first."""
    world = rank_and_world()[1]
    if world == 1:
        return results
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, results)
    merged: dict[K, V] = {}
    for part in parts:
        for key, value in part.items():
            merged.setdefault(key, value)
    return merged
