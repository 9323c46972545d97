"""Detectors that look at one number per step and say when it is out of line.

Their defaults come from `scripts/bench_guard.py`, which runs them on healthy runs of every exp and on runs
that diverge by themselves (README, "When a run diverges").
"""

import fnmatch
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from trainer.tasks.base import GANReport, PolicyReport, StepReport, ValueReport


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

    def update(self, value: float) -> Alarm | None:
        """An alarm if `value` is out of line, else None; non-finite values are another detector's
        business."""
        if not self.enabled or not value > 0 or math.isinf(value):
            return None
        self.warm = self.warm or len(self.values) >= self.warmup
        alarm = self._test(value) if self.warm else self._test_early(value)
        if alarm is None:
            self.alarmed.clear()
            self.values.append(value)
        else:
            self.alarmed.append(value)
            if len(self.alarmed) >= self.patience:  # the new normal
                self.values = deque(self.alarmed, maxlen=self.window)
                self.alarmed = []
        return alarm

    def score(self, value: float) -> tuple[float, float, float]:
        """(robust deviations above the median, value / median, the limit) of a positive value, on the current
        window; what `update` decides on."""
        logs = np.log(np.fromiter(self.values, float, len(self.values)))
        median = float(np.median(logs))
        spread = max(1.4826 * float(np.median(np.abs(logs - median))), 1e-6)
        limit = math.exp(median + max(self.threshold * spread, math.log(self.min_ratio)))
        return (math.log(value) - median) / spread, value / math.exp(median), limit

    def _test(self, value: float) -> Alarm | None:
        score, ratio, limit = self.score(value)
        if score <= self.threshold or ratio <= self.min_ratio:
            return None
        return Alarm(score, ratio, limit, f"the median of its last {len(self.values)} values")

    def _test_early(self, value: float) -> Alarm | None:
        if not self.values or value <= self.early_ratio * (largest := max(self.values)):
            return None
        return Alarm(
            0.0,
            value / largest,
            self.early_ratio * largest,
            f"the largest of the {len(self.values)} values before it",
        )

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "alarmed": list(self.alarmed), "warm": self.warm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = deque(state["values"], maxlen=self.window)
        self.alarmed, self.warm = list(state["alarmed"]), state["warm"]


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
        level = float(np.median(self.recent))
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


class SeriesWatch:
    """The spike and level detectors of every series, each made on first sight with that series' settings
    (`per_series` globs over the common ones; the guard's `action` is not theirs). Gradient norms are watched
    for spikes; losses for spikes and for their level. Either kind is off with `enabled: false`, for all
    series or some."""

    KINDS: ClassVar[dict[str, type[SpikeDetector | LevelDetector]]] = {
        "spike": SpikeDetector,
        "level": LevelDetector,
    }

    def __init__(self, spike: dict[str, Any] | None = None, level: dict[str, Any] | None = None):
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

    def detector(self, kind: str, series: str) -> SpikeDetector | LevelDetector:
        if series not in self.detectors[kind]:
            self.detectors[kind][series] = self.KINDS[kind](**settings_for(series, self.settings[kind]))
        return self.detectors[kind][series]

    def update(self, series: str, value: float, loss: bool) -> list[tuple[str, Alarm]]:
        """(kind, alarm) for each detector of the series that `value` sets off."""
        kinds = ("spike", "level") if loss else ("spike",)
        return [
            (kind, alarm)
            for kind in kinds
            if (alarm := self.detector(kind, series).update(value)) is not None
        ]

    def restart(self) -> None:
        """After a rollback: the values since the snapshot belong to a trajectory that is gone."""
        for detector in self.detectors["spike"].values():
            detector.alarmed.clear()
        for detector in self.detectors["level"].values():
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


class Streak:
    """True once a condition has held for `steps` steps in a row (then counting starts again)."""

    def __init__(self, steps: int):
        if steps < 1:
            raise ValueError(f"a streak needs steps >= 1, got {steps}")
        self.steps, self.count = steps, 0

    def update(self, holds: bool) -> bool:
        self.count = self.count + 1 if holds else 0
        if self.count >= self.steps:
            self.count = 0
            return True
        return False


class DiversityDrop:
    """Mode collapse seen at validation: the samples' diversity falls below `fraction` of the best it has
    reached, once that best is at least `reached` (an early generator is not diverse yet: not a collapse)."""

    def __init__(self, fraction: float = 0.5, reached: float = 0.3):
        self.fraction, self.reached = fraction, reached
        self.best = 0.0

    def update(self, diversity: float) -> bool:
        collapsed = (
            self.best >= self.reached and not diversity >= self.fraction * self.best
        )  # (NaN: collapsed)
        self.best = max(self.best, diversity) if math.isfinite(diversity) else self.best
        return collapsed


class CollapseWatch:
    """Collapses that only a task's own numbers show, read from the report types that carry them
    (trainer/tasks/base.py); each must hold for some steps in a row:
    - a GAN's discriminator wins outright, D(x) > `d_x_above` with D(G(z)) < `d_g_z_below`, for
      `d_wins_steps` steps: the generator gets no useful gradient;
    - a policy's entropy falls below `entropy_fraction` of the uniform policy's for `rl_steps` steps: it has
      become (nearly) deterministic and stops exploring;
    - Q-values exceed `value_multiple` times the largest return the rewards allow for `rl_steps` steps: the
      value estimates have blown up, which no correct Q-function can do;
    - one policy update moves the policy more than `max_policy_kl` (approximate KL divergence, nats) from the
      policy that collected its data: it left the trust region that PPO's clipping is meant to keep;
    and, at validation, the samples' diversity falls (`DiversityDrop`): mode collapse.
    """

    def __init__(
        self,
        d_wins_steps: int = 50,
        d_x_above: float = 0.99,
        d_g_z_below: float = 0.01,
        entropy_fraction: float = 0.2,
        value_multiple: float = 2.0,
        rl_steps: int = 5,
        max_policy_kl: float = 0.2,
        diversity_fraction: float = 0.5,
        diversity_reached: float = 0.3,
    ):
        self.d_x_above, self.d_g_z_below, self.max_policy_kl = d_x_above, d_g_z_below, max_policy_kl
        self.entropy_fraction, self.value_multiple = entropy_fraction, value_multiple
        self.d_wins, self.deterministic, self.blown_up = (
            Streak(d_wins_steps),
            Streak(rl_steps),
            Streak(rl_steps),
        )
        self.diversity = DiversityDrop(diversity_fraction, diversity_reached)

    def step(self, report: StepReport, readings: dict[str, float]) -> tuple[str, str] | None:
        """(series, reason) when the step completes a collapse, else None."""
        if isinstance(report, GANReport):
            d_x, d_g_z = readings["D_x"], readings["D_G_z"]
            if self.d_wins.update(d_x > self.d_x_above and d_g_z < self.d_g_z_below):
                return "D_x", (
                    f"the discriminator has won outright for {self.d_wins.steps} steps (D(x)={d_x:.3f}, "
                    f"D(G(z))={d_g_z:.3g}): the generator gets no gradient to learn from"
                )
        if isinstance(report, PolicyReport) and report.max_entropy:
            entropy = readings["entropy"]
            if self.deterministic.update(entropy < self.entropy_fraction * report.max_entropy):
                return "entropy", (
                    f"the policy's entropy has stayed below {self.entropy_fraction:g} of the uniform "
                    f"policy's ({report.max_entropy:.3g}) for {self.deterministic.steps} steps "
                    f"(now {entropy:.3g}): policy collapse"
                )
        if isinstance(report, PolicyReport) and readings.get("approx_kl", 0.0) > self.max_policy_kl:
            kl = readings["approx_kl"]
            return "approx_kl", (
                f"one update moved the policy {kl:.3g} nats (approximate KL) from the policy "
                f"that collected its data, more than {self.max_policy_kl:g}: it left its trust "
                "region (learning rate too high?)"
            )
        if isinstance(report, ValueReport) and report.max_return:
            q = readings["q_values"]
            if self.blown_up.update(q > self.value_multiple * report.max_return):
                return "q_values", (
                    f"the mean Q-value {q:.4g} has stayed above {self.value_multiple:g}x the largest "
                    f"return the rewards allow ({report.max_return:.4g}) for {self.blown_up.steps} "
                    "steps: the value estimates have blown up"
                )
        return None

    def restart(self) -> None:
        """After a rollback: streaks start again."""
        for streak in (self.d_wins, self.deterministic, self.blown_up):
            streak.count = 0

    def validation(self, diversity: float) -> str | None:
        if self.diversity.update(diversity):
            return (
                f"the samples' diversity fell to {diversity:.3g} of the data's, "
                f"from {self.diversity.best:.3g} at best: mode collapse"
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "streaks": [s.count for s in (self.d_wins, self.deterministic, self.blown_up)],
            "best_diversity": self.diversity.best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for streak, count in zip((self.d_wins, self.deterministic, self.blown_up), state["streaks"]):
            streak.count = count
        self.diversity.best = state["best_diversity"]
