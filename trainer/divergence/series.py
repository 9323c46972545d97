"""Recorded runs: every number the guard watched, step by step (`divergence.record=true` writes
<run dir>/divergence/series.jsonl), and the guard's detectors run again over them offline.

`detect(read_record(path), settings)` says what the guard would have reported with other settings, without
training again: how the detector defaults were chosen (scripts/bench_guard.py) and how the tests check them
on recorded healthy and diverging runs.
"""

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config.build import build_settings
from trainer.divergence.collapse import CollapseWatch
from trainer.divergence.detectors import MetricLevel, SeriesWatch
from trainer.divergence.settings import CollapseSettings
from trainer.tasks import base

REPORTS = {
    cls.__name__: cls for cls in (base.StepReport, base.GANReport, base.PolicyReport, base.ValueReport)
}


@dataclass
class Step:
    step: int
    epoch: int
    batch_idx: int
    values: dict[str, float]  # everything the step reported
    grad_norms: dict[str, list[float]]  # per network, one per optimizer step
    report: base.StepReport  # its type and constants (the numbers are in `values`)


@dataclass
class Record:
    steps: list[Step] = field(default_factory=list)
    validations: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(s.step, s.values[name]) for s in self.steps if name in s.values]

    def grad_norms(self, network: str) -> list[tuple[int, float]]:
        return [(s.step, norm) for s in self.steps for norm in s.grad_norms.get(network, [])]


def read_record(path: str | Path) -> Record:
    """A series.jsonl (or .jsonl.gz) as the guard wrote it."""
    path = Path(path)
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as file:
        lines = file.read().splitlines()
    record = Record()
    for line in lines:
        entry = json.loads(line)
        if "val" in entry:
            record.validations.append((entry["step"], entry["val"]))
        elif (described := entry["report"]) is not None:
            # (DQN's steps report nothing before learning starts)
            report = REPORTS[described["type"]](
                # the losses' names only: their numbers are in `values`
                losses=dict.fromkeys(described["losses"]),  # pyright: ignore[reportArgumentType]
                **described["constants"],
            )
            record.steps.append(
                Step(
                    entry["step"],
                    entry.get("epoch", 0),
                    entry["batch_idx"],
                    entry["values"],
                    entry["grad_norms"],
                    report,
                )
            )
    return record


def detect(record: Record, settings: dict[str, Any]) -> list[tuple[int, str, str]]:
    """(step, detector, series) of every alarm the guard's spike, blow-up, level, metric and collapse
    detectors raise on the recorded numbers with these `divergence` settings (the config node), in the order
    the guard meets them: each optimizer step's gradient norm, then the step's report, its validation, the
    end of its epoch. (The guard live compares gradient norms with the limits of a batch before.)"""
    watch = SeriesWatch(settings.get("spike"), settings.get("level"), settings.get("blowup"))
    collapse_settings = build_settings(CollapseSettings, settings.get("collapse"), "divergence.collapse")
    collapse = CollapseWatch(collapse_settings) if collapse_settings.enabled else None
    metric = MetricLevel(**{k: v for k, v in (settings.get("metric") or {}).items() if k != "action"})
    validations = dict(record.validations)
    alarms = []
    for i, step in enumerate(record.steps):
        for network, norms in step.grad_norms.items():
            for norm in norms:
                series = f"grad_norm/{network}"
                alarms += [(step.step, kind, series) for kind, _ in watch.update(series, norm, loss=False)]
        for name in step.report.losses:
            alarms += [
                (step.step, kind, name) for kind, _ in watch.update(name, step.values[name], loss=True)
            ]
        if collapse is not None and (collapsed := collapse.step(step.report, step.values, step.epoch)):
            alarms.append((step.step, "collapse", collapsed[0]))
        validation = validations.get(step.step, {})
        if metric.name in validation and metric.update(validation[metric.name]):
            alarms.append((step.step, "metric", metric.name))
        diversity = validation.get("val/sample_diversity")
        if collapse is not None and diversity is not None and collapse.validation(diversity):
            alarms.append((step.step, "collapse", "sample_diversity"))
        epoch_over = i + 1 == len(record.steps) or record.steps[i + 1].epoch != step.epoch
        if collapse is not None and epoch_over and (collapsed := collapse.epoch_end(step.epoch)):
            alarms.append((step.step, "collapse", collapsed[0]))
    return alarms
