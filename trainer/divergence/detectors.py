"""Detectors that look at one number per step (or per validation) and say when it is out of line; the
collapse checks, which read a task's own numbers, are in collapse.py.

Their defaults come from `scripts/bench_guard.py`, which runs them on healthy runs of every exp and on runs
that diverge by themselves (docs/divergence.md, docs/benchmarks.md).
"""

import fnmatch
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, overload

import numpy as np


@dataclass(frozen=True)
class Alarm:
    score: float  # robust standard deviations above the reference level
    ratio: float  # value / the reference level
    limit: float  # the largest value that would not have alarmed: what adaptive clipping scales down to
    text: str  # what the reference level is

    def describe(self) -> str:
        return f"{self.ratio:.3g}x {self.text}" + (
            f" ({self.score:.1f} robust deviations)" if self.score else ""
        )


def settings_for(series: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings of one series: the common ones, then every `per_series` entry whose glob matches it."""
    settings = dict(settings)
    for pattern, overrides in (settings.pop("per_series", None) or {}).items():
        if fnmatch.fnmatchcase(series, pattern):
            settings.update(overrides)
    return settings


class SpikeDetector:
    """Flags a value far above the recent level of its series.

    The level is the median of the last `window` values and the spread their median absolute deviation
    (scaled to a standard deviation), both on a log scale: gradient norms and losses are positive,
    heavy-tailed and multiplicative, and a few past spikes move neither. A value alarms when it is more than
    `threshold` deviations above the median and also more than `min_ratio` times it (on a very smooth series
    a tiny change is many deviations). Nothing alarms before `warmup` values. Alarming values stay out of
    the window, so one spike does not teach the detector that spikes are normal; after `patience` alarms in
    a row they replace it, so a lasting change of level becomes the new normal instead of an endless alarm.
    Before `warmup` values there is no spread to measure yet, and a value alarms only when it is more than
    `early_ratio` times every value before it: a run that explodes in its first steps is caught there.
    Values of zero or below (a loss can be exactly 0) are passed over.
    """

    def __init__(
        self,
        window: int = 200,
        warmup: int = 50,
        threshold: float = 6.0,
        min_ratio: float = 3.0,
        patience: int = 10,
        early_ratio: float = 10.0,
        enabled: bool = True,
    ):
        if not 2 <= warmup <= window:
            raise ValueError(f"need 2 <= warmup <= window, got warmup={warmup}, window={window}")
        if threshold <= 0 or min_ratio < 1 or early_ratio < 1 or patience < 1:
            raise ValueError("need threshold > 0, min_ratio >= 1, early_ratio >= 1 and patience >= 1")
        self.window, self.warmup, self.threshold = window, warmup, threshold
        self.min_ratio, self.early_ratio, self.patience, self.enabled = (
            min_ratio,
            early_ratio,
            patience,
            enabled,
        )
        self.values: deque[float] = deque(maxlen=window)
        self.alarmed: list[float] = []  # the current run of alarming values
        self.warm = False  # seen `warmup` values; after a change of level, `patience` values will do
        self._limit: float | None = None  # limit() of the current window, until the window changes

    def update(self, value: float, limit: float | None = None) -> Alarm | None:
        """An alarm if `value` is out of line, else None; non-finite values are another detector's
        business. `limit`: the one a decision on the device used (`limit()` of an earlier window), so that
        what is reported is what was done; else the current window's."""
        if not self.enabled or not value > 0 or math.isinf(value):
            return None
        limit = self.limit() if limit is None else limit
        alarm = self._alarm(value, limit) if value > limit else None
        self.warm = self.warm or len(self.values) >= self.warmup
        if alarm is None:
            self.alarmed.clear()
            self.values.append(value)
            self._limit = None
        else:
            self.alarmed.append(value)
            if len(self.alarmed) >= self.patience:  # the new normal
                self.values = deque(self.alarmed, maxlen=self.window)
                self.alarmed, self._limit = [], None
        return alarm

    def limit(self) -> float:
        """The largest next value that does not alarm: `threshold` robust deviations and `min_ratio` times
        above the window's median; before `warmup` values, `early_ratio` times the largest so far."""
        if self._limit is None:
            self._limit = self._compute_limit()
        return self._limit

    def _compute_limit(self) -> float:
        if not self.enabled or not self.values:
            return math.inf
        if not (self.warm or len(self.values) >= self.warmup):
            return self.early_ratio * max(self.values)
        median, spread = self._centre()
        return math.exp(median + max(self.threshold * spread, math.log(self.min_ratio)))

    def score(self, value: float) -> tuple[float, float]:
        """(robust deviations above the median, value / median) of a positive value on the current window."""
        median, spread = self._centre()
        return (math.log(value) - median) / spread, value / math.exp(median)

    def _centre(self) -> tuple[float, float]:
        """The median of the window's logs and their spread (MAD scaled to a standard deviation)."""
        logs = np.log(np.fromiter(self.values, float, len(self.values)))
        median = _median(logs)
        return median, max(1.4826 * _median(np.abs(logs - median)), 1e-6)

    def _alarm(self, value: float, limit: float) -> Alarm:
        if self.warm or len(self.values) >= self.warmup:
            score, ratio = self.score(value)
            return Alarm(score, ratio, limit, f"the median of its last {len(self.values)} values")
        largest = max(self.values)
        return Alarm(0.0, value / largest, limit, f"the largest of the {len(self.values)} values before it")

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "alarmed": list(self.alarmed), "warm": self.warm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = deque(state["values"], maxlen=self.window)
        self.alarmed, self.warm, self._limit = list(state["alarmed"]), state["warm"], None


class LevelDetector:
    """Flags a loss whose level has risen far above the best level it reached: the median of its last
    `window` values more than `ratio` times the lowest such median so far (after `warmup` values). Medians
    ignore single spikes; this sees a run that is getting worse and stays worse, however gradually."""

    def __init__(self, window: int = 20, ratio: float = 2.0, warmup: int = 50, enabled: bool = True):
        if window < 1 or ratio <= 1 or warmup < window:
            raise ValueError("need window >= 1, ratio > 1 and warmup >= window")
        self.window, self.ratio, self.warmup, self.enabled = window, ratio, warmup, enabled
        self.recent: deque[float] = deque(maxlen=window)
        self.best, self.seen = math.inf, 0

    def update(self, value: float) -> Alarm | None:
        if not self.enabled or not math.isfinite(value):
            return None
        self.recent.append(value)
        self.seen += 1
        if len(self.recent) < self.window:
            return None
        level = _median(np.fromiter(self.recent, float, len(self.recent)))
        alarm = None
        if self.seen >= self.warmup and level > self.ratio * self.best > 0:
            alarm = Alarm(
                0.0,
                level / self.best,
                math.inf,
                f"its best level: the median of its last {self.window} values is {level:.4g}, "
                f"was {self.best:.4g}",
            )
        self.best = min(self.best, level)
        return alarm

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "best": self.best, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque(state["recent"], maxlen=self.window)
        self.best, self.seen = state["best"], state["seen"]


def _median(values: np.ndarray) -> float:
    """np.median's value, by partition: a third of its time on a few hundred values (read every step)."""
    n, k = len(values), len(values) // 2
    if n % 2:
        return float(np.partition(values, k)[k])
    lower, upper = np.partition(values, [k - 1, k])[k - 1 : k + 1]
    return float((lower + upper) / 2)


class SeriesWatch:
    """The spike and level detectors of every series, each made on first sight with that series' settings
    (`per_series` globs over the common ones; the guard's `action` is not theirs). Gradient norms are watched
    for spikes; losses for spikes and for their level. Either kind is off with `enabled: false`, for all
    series or some."""

    KINDS: ClassVar[dict[str, type[SpikeDetector | LevelDetector]]] = {
        "spike": SpikeDetector,
        "level": LevelDetector,
    }

    def __init__(
        self,
        spike: dict[str, Any] | None = None,
        level: dict[str, Any] | None = None,
        blowup: dict[str, Any] | None = None,
    ):
        blowup = {k: v for k, v in (blowup or {}).items() if k != "action"}
        enabled, factor = blowup.pop("enabled", True), blowup.pop("factor", 100.0)
        if blowup or not factor > 1:
            raise ValueError(f"blowup takes enabled and factor > 1, got {blowup or factor}")
        self.blowup_factor = factor if enabled else math.inf
        self.settings = {
            kind: {k: v for k, v in (settings or {}).items() if k != "action"}
            for kind, settings in (("spike", spike), ("level", level))
        }
        self.detectors: dict[str, dict[str, SpikeDetector | LevelDetector]] = {
            kind: {} for kind in self.KINDS
        }
        for kind in self.KINDS:  # bad settings fail now, not at the first step
            self.detector(kind, "loss")
        self.detectors = {kind: {} for kind in self.KINDS}

    @overload
    def detector(self, kind: Literal["spike"], series: str) -> SpikeDetector: ...
    @overload
    def detector(self, kind: Literal["level"], series: str) -> LevelDetector: ...
    @overload
    def detector(self, kind: str, series: str) -> SpikeDetector | LevelDetector: ...
    def detector(self, kind: str, series: str) -> SpikeDetector | LevelDetector:
        if series not in self.detectors[kind]:
            self.detectors[kind][series] = self.KINDS[kind](**settings_for(series, self.settings[kind]))
        return self.detectors[kind][series]

    def update(
        self,
        series: str,
        value: float,
        loss: bool,
        limit: float | None = None,
        blowup_limit: float | None = None,
    ) -> list[tuple[str, Alarm]]:
        """(kind, alarm) for each detector of the series that `value` sets off: a spike, or a blow-up when it
        is more than `blowup.factor` times past the spike limit; the level of a loss. `limit` and
        `blowup_limit`: those a decision on the device used (SpikeDetector.update)."""
        alarms = []
        if (alarm := self.detector("spike", series).update(value, limit)) is not None:
            blown = value > (blowup_limit if blowup_limit is not None else self.blowup_factor * alarm.limit)
            alarms.append(("blowup" if blown else "spike", alarm))
        if loss and (alarm := self.detector("level", series).update(value)) is not None:
            alarms.append(("level", alarm))
        return alarms

    def limits(self, series: str) -> tuple[float, float]:
        """The spike limit and the blow-up limit for the next value of `series`."""
        limit = self.detector("spike", series).limit()
        return limit, limit * self.blowup_factor

    def restart(self) -> None:
        """After a rollback: the values since the snapshot belong to a trajectory that is gone."""
        for detector in self.detectors["spike"].values():
            assert isinstance(detector, SpikeDetector)
            detector.alarmed.clear()
        for detector in self.detectors["level"].values():
            assert isinstance(detector, LevelDetector)
            detector.recent.clear()

    def state_dict(self) -> dict[str, Any]:
        return {
            kind: {series: d.state_dict() for series, d in detectors.items()}
            for kind, detectors in self.detectors.items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for kind, detectors in state.items():
            for series, detector_state in detectors.items():
                self.detector(kind, series).load_state_dict(detector_state)


class MetricLevel:
    """The validation metric that defines "best" (`monitor.metric`), worse than the best it reached by more
    than `margin` of that best for `evaluations` evaluations in a row: a run that got worse where it matters
    and stayed worse. Healthy runs of every exp fell at most 36% below their best for two evaluations in a
    row (DQN's return), the zoo's failing runs 62% to 180% (scripts/bench_guard.py)."""

    def __init__(
        self,
        name: str | None = None,
        mode: str = "max",
        margin: float = 0.5,
        evaluations: int = 2,
        enabled: bool = True,
    ):
        if mode not in ("min", "max") or not margin > 0 or evaluations < 1:
            raise ValueError("metric needs mode min or max, margin > 0 and evaluations >= 1")
        self.name = name if enabled else None
        self.mode, self.margin, self.evaluations = mode, margin, evaluations
        self.best, self.worse = math.nan, 0  # evaluations in a row worse than the best by the margin

    def update(self, value: float) -> str | None:
        """Why the metric is in alarm after this evaluation, else None."""
        if math.isnan(self.best):
            self.best = value if math.isfinite(value) else self.best
            return None
        shortfall = (self.best - value if self.mode == "max" else value - self.best) / abs(self.best or 1.0)
        self.worse = self.worse + 1 if not shortfall <= self.margin else 0  # (NaN: worse)
        if math.isfinite(value) and (value > self.best if self.mode == "max" else value < self.best):
            self.best = value
        if self.worse < self.evaluations:
            return None
        return (
            f"{self.name} is {value:.4g}, {shortfall:.0%} worse than its best {self.best:.4g} at "
            f"{self.evaluations if self.worse == self.evaluations else self.worse} evaluations in a row"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "worse": self.worse}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.worse = state["best"], state["worse"]
