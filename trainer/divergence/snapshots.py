"""The states a rollback returns to: what a checkpoint holds of the model, the optimizers and schedulers, the
task's own state (its `on_save_checkpoint`: RL's env steps), and under local SGD or DiLoCo the last sync.

A snapshot is copied to host memory without the host waiting (pinned memory, as the readout's values). The
guard reads a batch's alarms one batch late, so a snapshot taken at the end of batch K counts only once batch
K has been read without a rollback (`confirm`); until then a rollback returns to the one before it.
"""

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning_utilities.core.apply_func import apply_to_collection

from trainer.distributed.sync import local_sync


@dataclass
class Snapshot:
    step: int
    state: dict[str, Any]
    copied: Any  # a CUDA event once the copy to the host is done; None on CPU

    def wait(self) -> dict[str, Any]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.state


def to_host(tree: Any) -> Any:
    """A copy of every tensor of `tree` in host memory; from a GPU without waiting (into pinned memory)."""
    return apply_to_collection(
        tree,
        torch.Tensor,
        lambda t: t.detach().to("cpu", non_blocking=True) if t.is_cuda else t.detach().clone(),
    )


class Snapshots:
    def __init__(self) -> None:
        self.confirmed: Snapshot | None = None
        self.candidate: Snapshot | None = None

    @property
    def empty(self) -> bool:
        return self.confirmed is None and self.candidate is None

    def take(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        state = {
            "state_dict": pl_module.state_dict(),
            "optimizer_states": [o.state_dict() for o in trainer.optimizers],
            "lr_schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
        }
        pl_module.on_save_checkpoint(state)
        sync = local_sync(trainer)
        state["worker_sync"] = sync.rollback_state(trainer) if sync is not None else None
        state = to_host(state)
        copied = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            copied = torch.cuda.Event()
            copied.record()
        self.candidate = Snapshot(step, state, copied)

    def confirm(self, step: int) -> None:
        """Batch `step` was read and nothing went wrong in it: a snapshot taken at its end is good."""
        if self.candidate is not None and self.candidate.step <= step:
            self.confirmed, self.candidate = self.candidate, None

    def restore(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int | None:
        """Puts the last confirmed snapshot back; returns its step (None: there is none)."""
        self.candidate = None
        if self.confirmed is None:
            return None
        state = self.confirmed.wait()
        pl_module.load_state_dict(state["state_dict"])
        for optimizer, saved in zip(trainer.optimizers, state["optimizer_states"]):
            # A copy: the optimizer updates the tensors it is given in place, and the snapshot must stay.
            optimizer.load_state_dict(to_host(saved))
        for config, saved in zip(trainer.lr_scheduler_configs, state["lr_schedulers"]):
            config.scheduler.load_state_dict(saved)
        pl_module.on_load_checkpoint(to_host(state))
        if state["worker_sync"] is not None:  # local SGD, DiLoCo: back to that step's last sync, too
            sync = local_sync(trainer)
            assert sync is not None  # (the snapshot was taken with it)
            sync.roll_back(trainer, state["worker_sync"])
        return self.confirmed.step

    def clear(self) -> None:
        self.confirmed = self.candidate = None
