"""Fault injection for drills: break a run on purpose at step K and check that the guard catches it.

divergence.inject.step=K with kind
- nan_batch: the first sample of the batch becomes NaN (a corrupt record in the data);
- nan_weight: one weight of `layer` becomes NaN (a bad kernel, a bit flip);
- huge_lr: every learning rate is multiplied by 1e6 for that step.
`rank` limits the fault to one data-parallel rank (null: all ranks).
"""

from typing import Any

import lightning as L
import torch

from trainer.errors import UserError
from trainer.lightning_internals import log_step
from trainer.metrics.gradients import layers_of

KINDS = ("nan_batch", "nan_weight", "huge_lr")


class FaultInjector(L.Callback):
    def __init__(self, step: int, kind: str = "nan_batch", layer: str | None = None, rank: int | None = None):
        if kind not in KINDS:
            raise UserError(f"divergence.inject.kind={kind} is not one of {', '.join(KINDS)}")
        if kind == "nan_weight" and not layer:
            raise UserError("divergence.inject.kind=nan_weight needs divergence.inject.layer=<module name>")
        self.step, self.kind, self.layer, self.rank = step, kind, layer, rank
        self._saved_lrs: list[list[float]] | None = None

    def _active(self, trainer: L.Trainer) -> bool:
        return log_step(trainer) == self.step and self.rank in (None, trainer.global_rank)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any
    ) -> None:
        if not self._active(trainer):
            return
        if self.kind == "nan_batch":
            first_float_tensor(batch)[0].fill_(float("nan"))
        elif self.kind == "nan_weight":
            layer = layers_of(pl_module).get(self.layer or "")
            # (its parameters: a parametrized layer's are the originals, as spectral norm keeps them)
            weights = list(layer.parameters()) if layer is not None else []
            if not weights:
                raise UserError(
                    f"divergence.inject.layer={self.layer} is not a layer with weights of this model"
                )
            with torch.no_grad():
                weights[0].view(-1)[0] = float("nan")
        else:
            self._saved_lrs = [[g["lr"] for g in opt.param_groups] for opt in trainer.optimizers]
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] *= 1e6

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._saved_lrs is not None:
            for opt, lrs in zip(trainer.optimizers, self._saved_lrs):
                for group, lr in zip(opt.param_groups, lrs):
                    group["lr"] = lr
            self._saved_lrs = None


def first_float_tensor(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor) and batch.is_floating_point():
        return batch
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        try:
            return first_float_tensor(item)
        except UserError:
            continue
    raise UserError("divergence.inject.kind=nan_batch: the batch holds no floating-point tensor to poison")
