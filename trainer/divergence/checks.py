"""Sanity checks from the field's standard advice, as tools.

- `InitialLossCheck`: a classifier's first loss should be about log(number of classes); far off means a bad
  initialisation or a wrong loss.
- `gradient_check`: compares a module's analytic gradients with two-sided finite differences in float64 and
  grades the relative error: < 1e-7 good, < 1e-5 fine (kinks such as ReLU), < 1e-3 suspicious, else wrong.
"""

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from trainer.tasks.base import step_report

log = logging.getLogger(__name__)


class InitialLossCheck(L.Callback):
    def __init__(self, num_classes: int, tolerance: float = 0.5):
        self.expected = math.log(num_classes)
        self.tolerance = tolerance
        self.first_loss: float | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any
    ) -> None:
        if self.first_loss is not None or trainer.global_step > 1:
            return
        report = step_report(pl_module, outputs)
        if report is None or not report.losses:
            return
        self.first_loss = float(sum(v.float() for v in report.losses.values()))
        off_by = abs(self.first_loss - self.expected) / self.expected
        for logger in trainer.loggers:
            logger.log_metrics(
                {"checks/initial_loss": self.first_loss, "checks/log_num_classes": self.expected}, 0
            )
        if off_by > self.tolerance:
            log.warning(
                f"initial loss {self.first_loss:.3f} is {off_by:.0%} away from log(num_classes) = "
                f"{self.expected:.3f}: check the initialisation of the last layer and the loss"
            )


@dataclass
class GradCheckResult:
    parameter: str
    max_relative_error: float

    @property
    def verdict(self) -> str:
        error = self.max_relative_error
        return (
            "good" if error < 1e-7 else "fine" if error < 1e-5 else "suspicious" if error < 1e-3 else "wrong"
        )


def gradient_check(
    module: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    loss_fn: Callable[[Any], torch.Tensor] = lambda out: out.square().sum(),
    eps: float = 1e-6,
    entries_per_parameter: int = 10,
    seed: int = 0,
) -> list[GradCheckResult]:
    """Relative error between analytic and numerical gradients for a sample of each parameter's entries."""
    module = copy.deepcopy(module).double()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)

    def loss() -> torch.Tensor:
        return loss_fn(module(*inputs))

    module.zero_grad()
    loss().backward()
    generator = torch.Generator().manual_seed(seed)
    results = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue  # frozen: no gradient to check
            # No gradient: autograd sees no path from the parameter to the loss; the finite differences tell
            # whether there is none.
            flat = p.view(-1)
            grad = p.grad.view(-1) if p.grad is not None else torch.zeros_like(flat)
            worst = 0.0
            for i in torch.randperm(flat.numel(), generator=generator)[:entries_per_parameter].tolist():
                original = flat[i].item()
                flat[i] = original + eps
                up = loss().item()
                flat[i] = original - eps
                down = loss().item()
                flat[i] = original
                numeric, analytic = (up - down) / (2 * eps), grad[i].item()
                worst = max(worst, abs(analytic - numeric) / max(abs(analytic) + abs(numeric), 1e-12))
            results.append(GradCheckResult(name, worst))
    return results
