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

from trainer.divergence.detectors import CollapseWatch, SeriesWatch
from trainer.tasks import base

REPORTS = {
    cls.__name__: cls for cls in (base.StepReport, base.GANReport, base.PolicyReport, base.ValueReport)
}


@dataclass
class Step:
    step: int
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
                losses=dict.fromkeys(described["losses"]), **described["constants"]
            )
            record.steps.append(
                Step(entry["step"], entry["batch_idx"], entry["values"], entry["grad_norms"], report)
            )
    return record


def detect(record: Record, settings: dict[str, Any]) -> list[tuple[int, str, str]]:
    """(step, detector, series) of every alarm the guard's spike, level and collapse detectors raise on the
    recorded numbers with these `divergence` settings (the config node's spike, level, collapse), in the
    order the guard meets them: each optimizer step's gradient norm, then the step's report."""
    watch = SeriesWatch(settings.get("spike"), settings.get("level"))
    collapse_settings = {
        k: v for k, v in (settings.get("collapse") or {}).items() if k not in ("action", "enabled")
    }
    collapse = (
        CollapseWatch(**collapse_settings) if (settings.get("collapse") or {}).get("enabled", True) else None
    )
    diversity = {
        step: values["val/sample_diversity"]
        for step, values in record.validations
        if "val/sample_diversity" in values
    }
    alarms = []
    for step in record.steps:
        for network, norms in step.grad_norms.items():
            for norm in norms:
                alarms += [
                    (step.step, kind, f"grad_norm/{network}")
                    for kind, _ in watch.update(f"grad_norm/{network}", norm, loss=False)
                ]
        for name in step.report.losses:
            alarms += [
                (step.step, kind, name) for kind, _ in watch.update(name, step.values[name], loss=True)
            ]
        if collapse is not None and (collapsed := collapse.step(step.report, step.values)) is not None:
            alarms.append((step.step, "collapse", collapsed[0]))
        if collapse is not None and step.step in diversity and collapse.validation(diversity[step.step]):
            alarms.append((step.step, "collapse", "sample_diversity"))
    return alarms
