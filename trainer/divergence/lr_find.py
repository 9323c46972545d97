"""LR range test (Smith, 2017): raise the learning rate exponentially, one batch at a time, and watch the
loss.

`python -m trainer +exp=NAME mode=lr_find [lr_find.min_lr=1e-7 lr_find.max_lr=1 lr_find.num_steps=100]`
trains from the initial weights with every optimizer's learning rate set to the sweep value, stops when the
smoothed loss passes `stop_factor` x its best, then writes <run dir>/lr_find.json and lr_find.png, logs both
to the loggers and prints a suggestion: a tenth of the rate where the smoothed loss is lowest (fastai's
"minimum" rule, one order of magnitude below where the loss stops falling), with a warning when the curve
cannot support it (the lowest loss at an end of the range, a fall lost in the batches' noise).

Measured against plain sweeps of constant rates half a decade apart (the best mean loss over the last 10 of
100 steps, 60 for QA): the own-task classifier 0.020 (sweep 0.03), an MLP regressor 0.023 (0.03), the DCGAN
3.4e-4 (1e-4 to 3e-4), QA 1.5e-4 (1e-4). The steepest fall of the smoothed loss, suggested before, gave the
classifier 0.033, but the regressor 1.2e-7 (its noisy first steps), the DCGAN 0.12 and QA 1.3e-3.
"""

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import lightning as L
import numpy as np
from omegaconf import DictConfig, open_dict

from trainer.config.ranges import FractionBelowOne, Interval, PositiveFloat
from trainer.tasks.base import step_report

log = logging.getLogger(__name__)


def lr_find_config(cfg: DictConfig) -> DictConfig:
    """The run's config turned into an LR sweep: no checkpoints, resume or validation; no guard halting it."""
    with open_dict(cfg):
        cfg.resume, cfg.ckpt_path, cfg.monitor.metric = "never", None, None
        cfg.callbacks = {k: v for k, v in (cfg.callbacks or {}).items() if k != "last_checkpoint"}
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.enable_checkpointing = False  # (else Lightning saves the weights the sweep blew up)
        # The test stops itself after num_steps batches, which this many epochs always hold; finite, so that
        # schedules sized by the run's length (QA's warm-up, the detector's one cycle) can be built.
        cfg.trainer.max_epochs = cfg.lr_find.num_steps
        cfg.trainer.max_steps = -1
        cfg.divergence.enabled = False
    return cfg


@dataclass
class Suggestion:
    lr: float | None
    lowest_at: float | None = None  # the rate of the lowest smoothed loss
    warnings: list[str] = field(default_factory=list)


def suggest(
    lrs: Sequence[float], raw: Sequence[float], smoothed: Sequence[float], diverged: bool
) -> Suggestion:
    """A tenth of the rate at the lowest smoothed loss, from a sweep's rates, its per-batch losses and their
    smoothed values; `diverged`: the sweep stopped on a blow-up rather than at its last rate. The first tenth
    of the sweep is left out (the average still settles there), and so is everything from the first
    non-finite loss on."""
    finite = np.isfinite(np.asarray(raw, float)) & np.isfinite(np.asarray(smoothed, float))
    end, start = int(np.argmin(finite)) if not finite.all() else len(finite), len(lrs) // 10
    kept_lrs, kept_raw, kept = (np.asarray(v, float)[start:end] for v in (lrs, raw, smoothed))
    if len(kept) < 3:
        return Suggestion(None, warnings=["too few finite losses to suggest a rate: raise lr_find.num_steps"])
    lowest = int(np.argmin(kept))
    lr = float(kept_lrs[lowest] / 10)
    found = Suggestion(lr, lowest_at=float(kept_lrs[lowest]))
    if lowest < max(1, len(kept) // 10):
        found.lr = None
        found.warnings.append(
            "the loss is lowest at the bottom of the range, so it never falls: lower lr_find.min_lr, or "
            "check that the task learns"
        )
        return found
    found.warnings = _doubts(lr, kept_lrs, kept_raw, kept, lowest, diverged)
    return found


def _doubts(
    lr: float, lrs: np.ndarray, raw: np.ndarray, smoothed: np.ndarray, lowest: int, diverged: bool
) -> list[str]:
    """What makes a suggestion doubtful: a lowest loss at an end of the range, or a fall in the noise."""
    doubts = []
    if math.log(lr / lrs[0]) < 0.1 * math.log(lrs[-1] / lrs[0]):
        doubts.append("the suggestion sits at the bottom end of the range or below: lower lr_find.min_lr")
    if not diverged and lowest >= len(smoothed) - max(2, len(smoothed) // 20):
        doubts.append(
            f"the loss still falls at the top of the range ({lrs[-1]:.3g}): a higher rate may be better; "
            "raise lr_find.max_lr"
        )
    fall = smoothed[: max(3, len(smoothed) // 10)].mean() - smoothed[lowest]
    noise = batch_noise(raw[: lowest + 1])
    if not fall > 2 * noise:  # (a nan noise, from too few steps, passes)
        doubts.append(
            f"the loss falls by {fall:.3g} over the sweep, not twice its batch-to-batch noise ({noise:.3g}): "
            "too noisy to trust; use larger batches or more lr_find.num_steps"
        )
    return doubts


def batch_noise(losses: np.ndarray) -> float:
    """The spread of single batches' losses around their trend: a robust standard deviation of the
    step-to-step changes (median absolute deviation), / sqrt(2) as each change holds two batches' noise."""
    changes = np.diff(losses)
    if len(changes) < 3:
        return math.nan
    return float(1.4826 * np.median(np.abs(changes - np.median(changes))) / math.sqrt(2))


class LRRangeTest(L.Callback):
    def __init__(
        self,
        min_lr: PositiveFloat = 1e-7,
        max_lr: PositiveFloat = 1.0,  # > min_lr (config/ranges.py RULES)
        num_steps: Annotated[int, Interval(low=3)] = 100,
        stop_factor: Annotated[float, Interval(low=1, low_open=True)] = 4.0,
        smoothing: FractionBelowOne = 0.9,
    ):
        self.min_lr, self.max_lr, self.num_steps = min_lr, max_lr, num_steps
        self.stop_factor, self.smoothing = stop_factor, smoothing
        self.lrs: list[float] = []
        self.raw: list[float] = []  # each batch's loss
        self.losses: list[float] = []  # their exponential moving average
        self.diverged = False
        self._average = 0.0

    def lr_at(self, i: int) -> float:
        return self.min_lr * (self.max_lr / self.min_lr) ** (i / (self.num_steps - 1))

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        lr = self.lr_at(len(self.lrs))
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        self.lrs.append(lr)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any
    ) -> None:
        report = step_report(pl_module, outputs)
        loss = float(sum(v.float() for v in report.losses.values())) if report is not None else math.nan
        self._average = self.smoothing * self._average + (1 - self.smoothing) * loss
        smoothed = self._average / (1 - self.smoothing ** len(self.lrs))  # bias-corrected
        self.raw.append(loss)
        self.losses.append(smoothed)
        self.diverged = not math.isfinite(smoothed) or smoothed > self.stop_factor * min(self.losses)
        if self.diverged or len(self.lrs) >= self.num_steps:
            trainer.should_stop = True

    def suggestion(self) -> Suggestion:
        return suggest(self.lrs, self.raw, self.losses, self.diverged)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        run_dir = Path(trainer.default_root_dir)
        found = self.suggestion()
        (run_dir / "lr_find.json").write_text(
            json.dumps(
                {
                    "lr": self.lrs,
                    "loss": self.losses,
                    "raw_loss": self.raw,
                    "suggested_lr": found.lr,
                    "lowest_loss_lr": found.lowest_at,
                    "warnings": found.warnings,
                }
            )
        )
        plot = self._plot(run_dir / "lr_find.png", found.lr)
        for logger in trainer.loggers:
            logger.log_metrics({"lr_find/suggested_lr": found.lr or float("nan")}, step=len(self.lrs))
            if callable(log_image := getattr(logger, "log_image", None)):  # (W&B's)
                log_image("lr_find", [str(plot)])
        if found.lr:
            log.info(
                f"lr_find suggests lr={found.lr:.3g}, a tenth of {found.lowest_at:.3g} where the smoothed "
                f"loss is lowest (loss against lr: {plot})"
            )
        for warning in found.warnings:
            log.warning(f"lr_find: {warning}")

    def _plot(self, path: Path, suggested: float | None) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs[: len(self.losses)], self.losses)
        if suggested:
            ax.axvline(suggested, color="red", linestyle="--", label=f"suggested {suggested:.2g}")
            ax.legend()
        ax.set(xscale="log", xlabel="learning rate", ylabel="loss (smoothed)", title="LR range test")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
