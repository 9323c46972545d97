"""<run dir>/metrics.json: the final and best value of every metric the task logs.

Scripts, sweeps and CI read results from this file without W&B. Its state travels in checkpoints, so a
resumed run keeps the best values of the run it continues.
"""

import math
import re
from pathlib import Path
from typing import Any

import lightning as L

from trainer.files import write_json_atomic
from trainer.loggers import log_step

# Metrics whose name matches are better when smaller; everything else (accuracy, AP, return, F1) when larger.
LOWER_IS_BETTER = re.compile(r"loss|error|err\b|_fd|fid|kl|perplexity|time|nan|inf", re.IGNORECASE)


def better_mode(name: str) -> str:
    return "min" if LOWER_IS_BETTER.search(name) else "max"


class MetricsFile(L.Callback):
    def __init__(self, path: str | Path, modes: dict[str, str] | None = None):
        self.path = Path(path)
        self.modes = dict(modes or {})
        self.metrics: dict[str, dict[str, Any]] = {}

    def record(self, metrics: dict[str, Any], step: int) -> None:
        """Takes the latest values: each one's final, and its best if it improved."""
        for name, value in metrics.items():
            value = float(value)
            entry = self.metrics.setdefault(name, {"mode": self.modes.get(name, better_mode(name))})
            entry["final"] = value
            best = entry.get("best")
            improved = best is None or (value < best if entry["mode"] == "min" else value > best)
            if math.isfinite(value) and (improved or not math.isfinite(best)):
                entry["best"], entry["best_step"] = value, step

    def _update(self, trainer: L.Trainer, write: bool) -> None:
        self.record(trainer.callback_metrics, trainer.global_step)
        if write and trainer.is_global_zero and self.metrics:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.metrics)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if log_step(trainer) % trainer.log_every_n_steps == 0:
            self._update(trainer, write=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._update(trainer, write=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._update(trainer, write=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._update(trainer, write=True)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._update(trainer, write=True)

    def state_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.metrics = state["metrics"]


def log_now(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Values for the loggers and metrics.json at this step, past Lightning's `self.log`, which costs about
    0.5 ms a key (it moves each metric's state to the device on every call): too much for a dozen values
    logged every few hundred environment steps. No aggregation and no cross-rank sync: rank-local values."""
    metrics = {name: float(value) for name, value in metrics.items()}  # W&B serializes tensors slowly
    step = log_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    for callback in trainer.callbacks:
        if isinstance(callback, MetricsFile):
            callback.record(metrics, trainer.global_step)
