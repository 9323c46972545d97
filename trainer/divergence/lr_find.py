"""LR range test (Smith, 2017): raise the learning rate exponentially, one batch at a time, and watch the
loss.

`python -m trainer +exp=NAME mode=lr_find [lr_find.min_lr=1e-7 lr_find.max_lr=1 lr_find.num_steps=100]`
trains from the initial weights with every optimizer's learning rate set to the sweep value, stops when the
smoothed loss passes `stop_factor` x its best, then writes <run dir>/lr_find.json and lr_find.png, logs both
to the loggers and prints a suggestion: the rate where the smoothed loss falls fastest.
"""

import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from omegaconf import DictConfig, open_dict

from trainer.tasks.base import step_report

log = logging.getLogger(__name__)


def lr_find_config(cfg: DictConfig) -> DictConfig:
    """The run's config turned into an LR sweep: no checkpoints, resume or validation; no guard halting it."""
    with open_dict(cfg):
        cfg.resume, cfg.ckpt_path, cfg.monitor.metric = "never", None, None
        cfg.callbacks = {k: v for k, v in (cfg.callbacks or {}).items() if k != "last_checkpoint"}
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.max_epochs = -1
        cfg.trainer.max_steps = -1
        cfg.divergence.enabled = False
    return cfg


class LRRangeTest(L.Callback):
    def __init__(
        self,
        min_lr: float = 1e-7,
        max_lr: float = 1.0,
        num_steps: int = 100,
        stop_factor: float = 4.0,
        smoothing: float = 0.9,
    ):
        if not 0 < min_lr < max_lr or num_steps < 3:
            raise ValueError("lr_find needs 0 < min_lr < max_lr and num_steps >= 3")
        self.min_lr, self.max_lr, self.num_steps = min_lr, max_lr, num_steps
        self.stop_factor, self.smoothing = stop_factor, smoothing
        self.lrs: list[float] = []
        self.losses: list[float] = []
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
        self.losses.append(smoothed)
        if (
            len(self.lrs) >= self.num_steps
            or not math.isfinite(smoothed)
            or smoothed > self.stop_factor * min(self.losses)
        ):
            trainer.should_stop = True

    def suggestion(self) -> float | None:
        """The rate at the steepest fall of the smoothed loss against log(lr), ignoring the exploding tail."""
        losses = np.array(self.losses)
        finite = np.isfinite(losses)
        if finite.sum() < 3:
            return None
        lrs, losses = np.array(self.lrs)[finite], losses[finite]
        return float(lrs[int(np.argmin(np.gradient(losses, np.log(lrs))))])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        run_dir = Path(trainer.default_root_dir)
        suggested = self.suggestion()
        (run_dir / "lr_find.json").write_text(
            json.dumps({"lr": self.lrs, "loss": self.losses, "suggested_lr": suggested})
        )
        plot = self._plot(run_dir / "lr_find.png", suggested)
        for logger in trainer.loggers:
            logger.log_metrics({"lr_find/suggested_lr": suggested or float("nan")}, step=len(self.lrs))
            if hasattr(logger, "log_image"):
                logger.log_image("lr_find", [str(plot)])
        log.info(
            f"lr_find suggests lr={suggested:.3g} (loss against lr: {plot})"
            if suggested
            else "lr_find found no falling stretch of the loss; widen lr_find.min_lr/max_lr"
        )

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
