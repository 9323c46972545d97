"""The way back from a bad update: the snapshots a rollback returns to (snapshots.py), how many rollbacks the
run has taken, the learning-rate factor they leave (`lr_scale`^n after the n-th, applied inside every
optimizer step, so that it holds across schedulers and tasks that set their own rate), and the BatchNorm
statistics of a batch whose update is dropped."""

from typing import Any

import lightning as L
import torch
from torch.utils.hooks import RemovableHandle

from trainer.divergence.records import float_buffers
from trainer.divergence.settings import RollbackSettings
from trainer.divergence.snapshots import Snapshots
from trainer.lightning_internals import log_step


class Rollback:
    def __init__(self, settings: RollbackSettings):
        self.lr_scale, self.max_rollbacks = settings.lr_scale, settings.max_rollbacks
        self.snapshot_every = settings.snapshot_every
        self.snapshots = Snapshots()
        self.count, self.lr_factor = 0, 1.0
        self._saved_lrs: dict[int, list[Any]] = {}
        self._buffer_slots: list[list[torch.Tensor]] = [[], []]  # by batch parity, reused

    def lr_hooks(self, optimizer: torch.optim.Optimizer) -> list[RemovableHandle]:
        """Applies the learning-rate factor within each step of `optimizer`, after whatever set the rate."""
        return [
            optimizer.register_step_pre_hook(self._scale_lr),
            optimizer.register_step_post_hook(self._restore_lr),
        ]

    def save_buffers(self, pl_module: L.LightningModule, parity: int) -> list[torch.Tensor]:
        """The BatchNorm statistics at the start of a batch (they move in the forward pass: a dropped update
        must not keep a bad batch's), in the slot of the batch's parity."""
        buffers = [b for _, b in float_buffers(pl_module)]
        slot = self._buffer_slots[parity]
        if buffers and len(slot) == len(buffers):  # (a transformer may have none)
            torch._foreach_copy_(slot, buffers)  # pyright: ignore[reportPrivateImportUsage]
        else:
            slot[:] = [b.detach().clone() for b in buffers]
        return slot

    def snapshot_if_due(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """Every `snapshot_every` steps, and at the end of the first batch (before it FSDP has not set up its
        shards); it counts once its batch reads clean (`Snapshots.confirm`)."""
        if (step + 1) % self.snapshot_every == 0 or self.snapshots.empty:
            self.snapshots.take(trainer, pl_module, step)

    def restore(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int | None:
        """Back to the last confirmed snapshot, with the learning rates scaled once more; returns the
        snapshot's step (None: there is none, nothing changed)."""
        step = self.snapshots.restore(trainer, pl_module)
        if step is None:
            return None
        self.count += 1
        self.lr_factor = self.lr_scale**self.count
        for logger in trainer.loggers:
            logger.log_metrics({"divergence/lr_factor": self.lr_factor}, step=log_step(trainer))
        return step

    def _scale_lr(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        if self.lr_factor != 1.0:
            self._saved_lrs[id(optimizer)] = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * self.lr_factor

    def _restore_lr(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        for group, lr in zip(optimizer.param_groups, self._saved_lrs.pop(id(optimizer), [])):
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.count, "lr_factor": self.lr_factor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.lr_factor = state["rollbacks"], state["lr_factor"]


def restore_buffers(
    pl_module: L.LightningModule, saved: list[torch.Tensor], networks: set[str] | None = None
) -> None:
    """Puts back the BatchNorm statistics of `networks` (all: None) as `save_buffers` kept them at the start
    of the batch: a dropped update must not keep its batch's."""
    pairs = [
        (b, kept)
        for (name, b), kept in zip(float_buffers(pl_module), saved)
        if networks is None or name.split(".", 1)[0] in networks
    ]
    if pairs:
        torch._foreach_copy_(  # pyright: ignore[reportPrivateImportUsage]
            [b for b, _ in pairs], [kept for _, kept in pairs]
        )
