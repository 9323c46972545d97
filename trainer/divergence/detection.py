"""What the guard's detectors find in the numbers it reads: the findings, in the order the guard acts on them.

The findings of a batch come one at a time (generators): the guard acts on each before the next detector
looks, so that a rollback, which restarts the detectors, comes before the next number is judged. The rules
that judge a whole run (the monitored metric's level, a GAN's discriminator winning an epoch, its samples'
diversity collapsed) are also kept as they stand (`standing`): if one still holds when training ends, the
run failed.
"""

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from typing import Any

import torch

from trainer.divergence.collapse import CollapseWatch
from trainer.divergence.detectors import MetricLevel, SeriesWatch
from trainer.divergence.gate import GateStep
from trainer.divergence.records import BatchRecord, Finding
from trainer.divergence.settings import DivergenceSettings
from trainer.errors import UserError
from trainer.metrics.gradients import layer_name


class Detection:
    def __init__(self, settings: DivergenceSettings, remember: Callable[[str, int, float], None]):
        self.remember = remember  # (series, step, value) of every number judged, before it is judged
        self.nonfinite, self.collapses = settings.nonfinite.enabled, settings.collapse.enabled
        try:
            self.watch = SeriesWatch(asdict(settings.spike), asdict(settings.level), asdict(settings.blowup))
            self.metric = MetricLevel(**_without(asdict(settings.metric), "action"))
            self.collapse = CollapseWatch(settings.collapse)
        except (TypeError, ValueError) as e:
            raise UserError(f"divergence: {e}") from None
        self.standing: dict[str, str] = {}  # the rules that judge the run and hold now, and why

    def gradient(
        self,
        record: BatchRecord,
        gate_step: GateStep,
        norm: float,
        names: Mapping[torch.nn.Parameter, str],
        check_nonfinite: bool,
    ) -> Iterator[Finding]:
        """An optimizer step's gradient norm, judged against the limits the gate held for it; a non-finite one
        where the gate checked for it (`check_nonfinite`)."""
        series, network = gate_step.series, gate_step.series.removeprefix("grad_norm/")
        self.remember(series, record.step, norm)
        if not math.isfinite(norm):
            if check_nonfinite:
                reason = _nonfinite_gradients(network, gate_step, names)
                yield Finding("nonfinite", series, reason, norm, record.step, record, gate_step)
            return
        limit, blowup = record.limits.get(series, (math.inf, math.inf))
        for kind, alarm in self.watch.update(series, norm, False, limit, blowup):
            reason = f"gradient norm of {network} is {norm:.4g}, {alarm.describe()}"
            yield Finding(kind, series, reason, norm, record.step, record, gate_step, alarm)

    def report(self, record: BatchRecord, readings: dict[str, float]) -> Iterator[Finding]:
        """The numbers a step reported: non-finite ones, the losses' spikes and levels, the collapse checks
        that the report's type names."""
        report, step = record.report, record.step
        assert report is not None
        for name, value in readings.items():
            self.remember(name, step, value)
        broken = [name for name, value in readings.items() if not math.isfinite(value)]
        if broken and self.nonfinite:
            name = next((n for n in broken if n in report.losses), broken[0])
            reason = f"{', '.join(broken)} {'is' if len(broken) == 1 else 'are'} {readings[name]}"
            yield Finding("nonfinite", name, reason, readings[name], step, record)
            return
        for name in report.losses:
            for kind, alarm in self.watch.update(name, readings[name], loss=True):
                reason = f"{name} is {readings[name]:.4g}, {alarm.describe()}"
                yield Finding(kind, name, reason, readings[name], step, record, alarm=alarm)
        collapsed = self.collapse.step(report, readings, record.epoch) if self.collapses else None
        if collapsed is not None:
            series, reason = collapsed
            yield Finding("collapse", series, reason, readings[series], step, record)

    def outer_step(self, step: int, norm: float, local_steps: int) -> Iterator[Finding]:
        """A sync of local SGD / DiLoCo: the norm of the workers' average change since the last sync (a
        non-finite one was not applied). Syncs before a validation come after fewer steps than H, so what
        the spike detector compares is the change per local step."""
        series, per_step = "outer/change_per_step", norm / max(1, local_steps)
        self.remember(series, step, per_step)
        if not math.isfinite(norm):
            if self.nonfinite:
                reason = f"the workers' average change since the last sync is {norm} (dropped)"
                yield Finding("nonfinite", series, reason, norm, step)
            return
        for kind, alarm in self.watch.update(series, per_step, loss=False):
            reason = f"the workers' average change per local step is {per_step:.4g}, {alarm.describe()}"
            yield Finding(kind, series, reason, per_step, step, alarm=alarm)

    def epoch_end(self, epoch: int, step: int) -> Finding | None:
        collapsed = self.collapse.epoch_end(epoch) if self.collapses else None
        self._judge("collapse", collapsed[1] if collapsed else None)
        return Finding("collapse", *collapsed, 1.0, step) if collapsed is not None else None

    def validation(self, metrics: Mapping[str, Any], diversity: float | None, step: int) -> Iterator[Finding]:
        """The monitored metric's level, and the samples' diversity a generative task reported."""
        name = self.metric.name
        if name is not None and (value := metrics.get(name)) is not None:
            reason = self.metric.update(float(value))
            self._judge("metric", reason)
            if reason is not None:
                yield Finding("metric", name, reason, float(value), step)
        if diversity is not None and self.collapses:
            reason = self.collapse.validation(diversity)
            self._judge("diversity", reason)
            if reason is not None:
                yield Finding("collapse", "sample_diversity", reason, diversity, step)

    def _judge(self, rule: str, reason: str | None) -> None:
        if reason is None:
            self.standing.pop(rule, None)
        else:
            self.standing[rule] = reason

    def verdict(self) -> str | None:
        """Why the run failed, by the rules that judge a whole run, as they stand."""
        return next(iter(self.standing.values()), None)

    def restart(self) -> None:
        """After a rollback: the values since the snapshot belong to a trajectory that is gone."""
        self.watch.restart()
        self.collapse.restart()

    def state_dict(self) -> dict[str, Any]:
        return {
            "watch": self.watch.state_dict(),
            "collapse": self.collapse.state_dict(),
            "metric": self.metric.state_dict(),
            "standing": self.standing,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.collapse.load_state_dict(state["collapse"])
        self.watch.load_state_dict(state["watch"])
        self.metric.load_state_dict(state["metric"])
        self.standing = dict(state["standing"])


def _without(settings: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in keys}


def _nonfinite_gradients(network: str, gate_step: GateStep, names: Mapping[torch.nn.Parameter, str]) -> str:
    bad = [
        names.get(p, "?") for p, n in zip(gate_step.params, gate_step.norms.tolist()) if not math.isfinite(n)
    ]
    layers = sorted({layer_name(name) for name in bad})
    more = ", ..." if len(layers) > 3 else ""
    return f"non-finite gradients in {network} ({len(layers)} layers: {', '.join(layers[:3])}{more})"
