"""<run dir>/metrics.json: the final and best value of every metric the task logs.

Scripts, sweeps and CI read results from this file without W&B. Its state travels in checkpoints, so a
resumed run keeps the best values of the run it continues.

Which value is "best" depends on the metric's direction ("mode": min, max, or null for a number with no
better direction, such as a spread or a length, which records its final value only). In order of precedence:
`monitor.mode` for the monitored metric; the config's `metrics.modes` ({val/mse: min}); the task's
`validation_metrics` class attribute (`{"val/mse": "min"}`); the table of usual names below; and failing all
of those a guess (higher is better), which is warned about once per validation metric.
"""

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L

from trainer.errors import UserError
from trainer.files import write_json_atomic
from trainer.lightning_internals import is_logging_step, log_step
from trainer.reporting.summary import is_validation_metric

log = logging.getLogger(__name__)

Mode = Literal["min", "max"] | None  # None: no better direction, no best

# The words of metric names whose direction is known. A name takes the direction of the last of its words
# found here ("train/loss_d": loss; "val/f1_no_answer": f1; "val/return_std": std), matched as whole words:
# split at anything but letters and digits, then at camelCase ("valLoss"), with trailing digits dropped
# ("AP50": ap), so that "info" is not "inf" nor "lossless" a loss.
LOWER_IS_BETTER = (
    "loss losses error errors err mse rmse mae mape nll fid fd kid kl perplexity ppl wer cer distance regret "
    "time latency nan nans inf"
)
HIGHER_IS_BETTER = (
    "accuracy acc f1 fbeta ap map ar auc auroc precision recall iou miou dice return returns reward rewards "
    "score inception bleu rouge exact em r2 psnr ssim diversity explained"
)
# Descriptions, not scores: a spread, a length (longer episodes are better in CartPole, worse in Acrobot), a
# number of steps, a learning rate or exploration setting.
NO_DIRECTION = "std stddev length steps lr epsilon"
DIRECTIONS: dict[str, Mode] = {
    **dict.fromkeys(LOWER_IS_BETTER.split(), "min"),
    **dict.fromkeys(HIGHER_IS_BETTER.split(), "max"),
    **dict.fromkeys(NO_DIRECTION.split(), None),
}
_CAMEL = re.compile(r"[A-Z]+[0-9]*(?![a-z])|[A-Z]?[a-z]+[0-9]*|[0-9]+")


def table_mode(name: str) -> tuple[Mode, bool]:
    """The direction of `name` by the table, and whether the table knew it; else the guess, higher is better
    (accuracy-like names are the common case)."""
    mode: Mode = "max"
    known = False
    for part in re.split(r"[^A-Za-z0-9]+", name):
        modes = _lookup(part) or [m for piece in _CAMEL.findall(part) for m in _lookup(piece)]
        if modes:
            mode, known = modes[-1], True
    return mode, known


def _lookup(word: str) -> list[Mode]:
    """[the word's direction] where the table knows the word, else []."""
    for spelling in (word.lower(), word.lower().rstrip("0123456789")):
        if spelling in DIRECTIONS:
            return [DIRECTIONS[spelling]]
    return []


def check_modes(modes: Mapping[str, Any], where: str) -> dict[str, Mode]:
    """Declared directions, refused in one line unless each is min, max or null."""
    for name, mode in modes.items():
        if mode not in ("min", "max", None):
            raise UserError(f"{where}: {name}={mode!r} is not a direction: use min, max or null (none)")
    return dict(modes)


class MetricsFile(L.Callback):
    def __init__(
        self,
        path: str | Path,
        modes: Mapping[str, Mode] | None = None,
        monitor: tuple[str, Mode] | None = None,
    ):
        """`modes`: the config's `metrics.modes`; `monitor`: (monitor.metric, monitor.mode), which wins for
        that metric. The task's `validation_metrics` join them when training starts."""
        self.path = Path(path)
        self.configured = check_modes(modes or {}, "metrics.modes")
        self.monitor = monitor
        self.modes = self._merged({})
        self.metrics: dict[str, dict[str, Any]] = {}
        self._speaks = True  # rank zero speaks for the run

    def _merged(self, task_modes: Mapping[str, Mode]) -> dict[str, Mode]:
        return {**task_modes, **self.configured, **(dict([self.monitor]) if self.monitor else {})}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        task = type(pl_module).__name__
        declared = getattr(pl_module, "validation_metrics", None) or {}
        task_modes = check_modes(declared, f"{task}.validation_metrics")
        self.modes, self._speaks = self._merged(task_modes), trainer.is_global_zero
        if self.monitor and self._speaks:
            self._check_monitor_mode(*self.monitor, {**task_modes, **self.configured})

    def _check_monitor_mode(self, metric: str, mode: Mode, declared: Mapping[str, Mode]) -> None:
        """monitor.mode decides the best checkpoint; one that contradicts what is known of the metric's
        direction is most likely a forgotten `monitor.mode=max` (its default is min)."""
        direction, known = (declared[metric], True) if metric in declared else table_mode(metric)
        if known and direction is not None and direction != mode:
            better = "lower" if direction == "min" else "higher"
            log.warning(
                f"monitor.mode={mode}, but {metric} is better when {better}: the best checkpoint keeps its "
                f"{'lowest' if mode == 'min' else 'highest'} value; set monitor.mode={direction} if that is "
                "not meant"
            )

    def mode_of(self, name: str) -> Mode:
        """The direction of `name`: declared, else by the table, else guessed; warned about once for a
        validation metric, whose best the summary shows and sweeps compare (a step's diagnostics, train/ or
        comm/, are recorded without a word)."""
        if name not in self.modes:
            self.modes[name], known = table_mode(name)
            if not known and self._speaks and is_validation_metric(name):
                log.warning(
                    f"metrics.json: the direction of {name} is a guess (higher is better); declare it on the "
                    f'task, validation_metrics = {{"{name}": "min"}} ("max", or None for none), or in the '
                    f"config, metrics.modes={{{name}:min}}"
                )
        return self.modes[name]

    def record(self, metrics: dict[str, Any], step: int) -> None:
        """Takes the latest values: each one's final, and its best if it improved."""
        for name, value in metrics.items():
            value, mode = float(value), self.mode_of(name)
            entry = self.metrics.get(name)
            if entry is None or entry["mode"] != mode:  # new, or declared otherwise since its best was taken
                entry = self.metrics[name] = {"mode": mode}
            entry["final"] = value
            if mode is None:
                continue
            best = entry.get("best")
            improved = (
                best is None or not math.isfinite(best) or (value < best if mode == "min" else value > best)
            )
            if math.isfinite(value) and improved:
                entry["best"], entry["best_step"] = value, step

    def _update(self, trainer: L.Trainer, write: bool) -> None:
        self.record(trainer.callback_metrics, trainer.global_step)
        if write and trainer.is_global_zero and self.metrics:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.metrics)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if is_logging_step(trainer):  # the values are read from the device: only when Lightning logs them
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
    for callback in trainer.callbacks:  # pyright: ignore[reportAttributeAccessIssue]  # set by Lightning
        if isinstance(callback, MetricsFile):
            callback.record(metrics, trainer.global_step)
