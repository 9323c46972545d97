"""RNG state in every checkpoint, so a resumed run draws the same random numbers as an uninterrupted one.

Every rank gets its own stream (seed + rank: GAN noise must differ between data-parallel workers). The
states of all ranks are saved; on resume each rank gets its own back just before its first batch, which
is the point where the uninterrupted run stood when the checkpoint was written (data loading and
validation draw from their own seeded generators, never from these).
"""

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist


def capture_rng() -> dict[str, Any]:
    """All global RNG states, in types that `torch.load(weights_only=True)` accepts."""
    numpy_state = np.random.get_state(legacy=True)
    assert isinstance(numpy_state, tuple)  # (legacy: the tuple, not the dict)
    kind, keys, pos, has_gauss, cached = numpy_state
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rank(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


class RNGState(L.Callback):
    def __init__(self, seed: int):
        self.seed = seed
        self._to_restore: list[dict[str, Any]] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The model is built (same weights on every rank); from here on each rank draws its own numbers.
        seed_rank(self.seed, trainer.global_rank)

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while a checkpoint is written; rank 0 saves the gathered list.
        state = capture_rng()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
            return {"ranks": states}
        return {"ranks": [state]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._to_restore = state["ranks"]

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self._to_restore is None:
            return
        states, self._to_restore = self._to_restore, None
        if len(states) == trainer.world_size:
            restore_rng(states[trainer.global_rank])
        else:  # resumed on a different number of ranks: fresh, distinct, reproducible streams
            seed_rank(self.seed + trainer.global_step, trainer.global_rank)
