"""The guard's part of an optimizer step, decided and carried out on the device: the host never waits for it.

Before each optimizer applies its gradients, the gate measures their norm (per parameter, then in total) and,
from the limits the spike detector last computed for that network, decides on the device:
- a non-finite update is never applied (fp16's loss scaler skips those itself);
- a norm over the spike limit, or over the blow-up limit (`blowup.factor` times it), is applied as it is
  (`warn`), scaled down to the spike limit (`clip`), or not applied (`skip`, `rollback`, `halt`), as the
  spike's or the blow-up's action says;
- an alarm whose action is `rollback` or `halt` freezes the model: no update is applied until the guard has
  read the alarm, one batch later, so that it goes back to (or stops at, and writes the bundle from) the
  state before the bad update.
A fused optimizer is told to skip through its `found_inf` tensor, as a loss scaler does; any other optimizer
needs its decision on the host: one read per optimizer step.

What the gate saw is kept as a `GateStep` per optimizer step, on the device, for the guard to read late.
"""

import functools
import math
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch

from trainer.distributed.fsdp import is_sharded, sum_over_shards
from trainer.distributed.sync import largest_over_workers
from trainer.metrics.gradients import grads, stepped_params

FREEZING = ("rollback", "halt")


@dataclass
class GateStep:
    """One optimizer step as the gate saw it. `values` (device, float32): the gradient norm, and whether the
    update was dropped."""

    series: str
    optimizer_index: int
    params: list[torch.nn.Parameter]
    norms: torch.Tensor  # gradient norm per parameter (device): what a report's per-layer norms come from
    values: torch.Tensor

    FIELDS = ("norm", "skipped")


class UpdateGate:
    def __init__(
        self, check_nonfinite: bool, nonfinite_action: str, spike_action: str, blowup_action: str
    ) -> None:
        self.check_nonfinite = check_nonfinite
        self.freeze_nonfinite = check_nonfinite and nonfinite_action in FREEZING
        self.bound_actions = (spike_action, blowup_action)  # for a norm past the spike / blow-up limit
        self.can_freeze = self.freeze_nonfinite or any(a in FREEZING for a in self.bound_actions)
        # Per series, on the device: the spike limit and the blow-up limit (+inf: none yet); and the same as
        # the host last wrote them, rounded to float32 as the device holds them, so that both compare alike.
        self.limits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.host_limits: dict[str, tuple[float, float]] = {}
        # Freezes set in each of the last two batches (by batch parity): a batch's freeze lasts until the
        # guard has read that batch, and reading it must not lift the next batch's.
        self.frozen: list[torch.Tensor] = []
        self.steps: list[GateStep] = []  # this batch's

    def start_batch(self, device: torch.device) -> None:
        if not self.frozen or self.frozen[0].device != device:
            self.frozen = [torch.zeros((), dtype=torch.bool, device=device) for _ in range(2)]
        self.steps = []

    def step(
        self,
        trainer: L.Trainer,
        optimizer: torch.optim.Optimizer,
        names: dict[torch.nn.Parameter, str],
        batch_parity: int,
    ) -> torch.Tensor | None:
        """Measures and decides one optimizer step; returns its "skip" flag (a float 0-d device tensor: a
        fused optimizer's `found_inf`), None when the optimizer steps nothing. The series is
        `grad_norm/<network>`, the network that `names` says owns the optimizer's first parameter."""
        params = stepped_params(optimizer, is_sharded(trainer.strategy))
        if not params:
            return None
        series = "grad_norm/" + names.get(params[0], "model").split(".", 1)[0]
        # The norm per parameter: of the whole parameter under FSDP (each rank holds a part of it), the
        # largest over workers under local SGD: the same numbers, so the same decisions, on every rank.
        norms = torch.stack(torch._foreach_norm(grads(params), 2, dtype=torch.float32))  # pyright: ignore[reportPrivateImportUsage]
        if is_sharded(trainer.strategy):
            norms = sum_over_shards(trainer, norms.square()).sqrt()
        norms = largest_over_workers(trainer, norms)
        norm = torch.linalg.vector_norm(norms)
        limit, blowup = self.limit_tensors(series, norm.device)
        drops, freezes, clips = [], [], []  # conditions that drop the update, also freeze, clip it
        if self.check_nonfinite:
            nonfinite = ~norm.isfinite()
            drops.append(nonfinite)
            freezes += [nonfinite] if self.freeze_nonfinite else []
        for action, bound in zip(self.bound_actions, (limit, blowup)):
            if action != "warn":
                over = norm > bound  # (False for NaN)
                (clips if action == "clip" else drops).append(over)
                freezes += [over] if action in FREEZING else []
        if clips:  # down to the spike limit, as adaptive clipping does
            over = functools.reduce(torch.logical_or, clips)
            torch._foreach_mul_(grads(params), torch.where(over, limit / norm, 1.0))  # pyright: ignore[reportPrivateImportUsage]
        if self.can_freeze:
            drops.append(self.frozen[0] | self.frozen[1])
            if freezes:
                self.frozen[batch_parity].logical_or_(functools.reduce(torch.logical_or, freezes))
        skip = functools.reduce(torch.logical_or, drops).float() if drops else None
        dropped = skip if skip is not None else torch.zeros_like(norm)
        index = trainer.optimizers.index(optimizer)
        self.steps.append(GateStep(series, index, params, norms, torch.stack([norm, dropped])))
        return skip

    def limit_tensors(self, series: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if series not in self.limits:
            self.limits[series] = (
                torch.full((), math.inf, device=device),
                torch.full((), math.inf, device=device),
            )
            self.host_limits[series] = (math.inf, math.inf)
        return self.limits[series]

    def set_limits(self, series: str, limit: float, blowup: float) -> None:
        """The spike and blow-up limits for the next values of `series` (writes to the device, no wait)."""
        if series not in self.limits:
            return
        rounded = (float(np.float32(limit)), float(np.float32(blowup)))
        for tensor, old, new in zip(self.limits[series], self.host_limits[series], rounded):
            if new != old:
                tensor.fill_(new)
        self.host_limits[series] = rounded

    def thaw(self, batch_parity: int | None = None) -> None:
        """Lifts the freeze a batch set (all freezes, with no parity: after a rollback)."""
        for parity, frozen in enumerate(self.frozen):
            if batch_parity in (None, parity):
                frozen.zero_()


def skip_update(optimizer: torch.optim.Optimizer, skip: torch.Tensor, scaler: object | None) -> None:
    """Drops the coming update when `skip` is 1: on the device through a fused optimizer's `found_inf` (the
    tensor a loss scaler sets for it), else by taking the gradients away after reading `skip` on the host."""
    if getattr(optimizer, "_step_supports_amp_scaling", False) and scaler is None:
        # (read by torch's fused optimizers; removed after the step: `forget_skip`)
        optimizer.found_inf = skip  # pyright: ignore[reportAttributeAccessIssue]
    elif bool(skip):
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = (
                    None  # torch's optimizers leave a parameter without a gradient alone, moments included
                )


def forget_skip(optimizer: torch.optim.Optimizer, *args: object) -> None:
    """A step post-hook: the next step decides anew."""
    optimizer.__dict__.pop("found_inf", None)
