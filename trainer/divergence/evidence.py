"""What the guard leaves of an event: a line in divergence/events-rank<r>.jsonl, the bundle that replays the
step (bundle.py), a picture of it (picture.py), W&B's copies of both, and with `record=true` every watched
number of every step in divergence/series.jsonl."""

import json
import math
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from trainer.distributed.fsdp import sum_over_shards
from trainer.divergence.bundle import bundle_dir, tensor_bytes, write_bundle
from trainer.divergence.gate import GateStep
from trainer.divergence.picture import draw_event
from trainer.divergence.policy import Decision
from trainer.divergence.records import BatchRecord, Finding, float_buffers
from trainer.metrics.gradients import layer_name


class Evidence:
    """The evidence of the guard's alarms: what it keeps for them (the recent values of every watched series,
    the bytes of the bundles written so far) and what it writes of each (its event, and for a reported one a
    bundle within `max_bundle_mb`, except a halt's, and a picture)."""

    def __init__(self, history: int, max_bundle_mb: float, pictures: bool, record: bool):
        self.history: dict[str, deque[tuple[int, float]]] = defaultdict(lambda: deque(maxlen=history))
        self.max_bundle_bytes, self.bundle_bytes = max_bundle_mb * 2**20, 0
        self.pictures, self.recording = pictures, record  # recording: every number of every step
        self.names: dict[torch.nn.Parameter, str] = {}  # the model's parameters' names, given at setup

    def remember(self, series: str, step: int, value: float) -> None:
        self.history[series].append((step, value))

    def record(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        finding: Finding,
        decision: Decision,
        lr_factor: float,
    ) -> tuple[dict[str, Any], list[str] | None]:
        """The event of a decided alarm; reported, its bundle and picture (the notes say where, or why there
        is no bundle; None: not reported); and its line in the events file."""
        limit = finding.alarm.limit if finding.alarm is not None else math.inf
        event = {
            "detector": finding.detector,
            "series": finding.series,
            "reason": decision.reason,
            "value": finding.value,
            "step": finding.step,
            "action": decision.action,
            "reported": decision.reported,
            "global_step": trainer.global_step,
            "lr_factor": lr_factor,
            "optimizer_index": finding.gate_step.optimizer_index if finding.gate_step is not None else None,
            **({"limit": limit} if math.isfinite(limit) else {}),
        }
        notes = self._report(trainer, pl_module, event, finding) if decision.reported else None
        if decision.recorded:
            record_event(trainer, event)
        return event, notes

    def _report(
        self, trainer: L.Trainer, pl_module: L.LightningModule, event: dict[str, Any], finding: Finding
    ) -> list[str]:
        """The bundle (within the size cap; a training batch's alarms only) and the picture."""
        record = finding.record
        steps = [finding.gate_step] if finding.gate_step else record.gate_steps if record is not None else []
        notes, with_bundle, bundle = [], False, {}
        if record is not None:
            size = bundle_size(trainer, pl_module, record.data)
            with_bundle = event["action"] == "halt" or self.bundle_bytes + size <= self.max_bundle_bytes
            self.bundle_bytes += size if with_bundle else 0
            names = [name for name, _ in float_buffers(pl_module)]
            bundle = {
                "batch": record.data,
                "rng": record.rng,
                "batch_idx": record.batch_idx,
                "buffers_at_start": dict(zip(names, record.buffers)),
                "lrs": record.lrs,
            }
            if not with_bundle:
                notes.append(f"no bundle: divergence.max_bundle_mb={self.max_bundle_bytes / 2**20:g} reached")
        return notes + write_evidence(
            trainer,
            event,
            with_bundle=with_bundle,
            pictures=self.pictures,
            history={name: list(points) for name, points in self.history.items()},
            layer_norms=self._layer_norms(steps),
            **bundle,
        )

    def _layer_norms(self, steps: list[GateStep]) -> dict[str, float]:
        """Per-layer norms of the gradients the gate measured: those of the steps that went wrong (the last of
        each network's, for an alarm on the step's report)."""
        last = {s.series: s for s in steps}
        norms: dict[str, float] = {}
        for gate_step in last.values():
            layers: dict[str, float] = defaultdict(float)
            for p, norm in zip(gate_step.params, gate_step.norms.tolist()):
                layers[layer_name(self.names.get(p, "unnamed"))] += norm**2
            norms.update({layer: math.sqrt(total) for layer, total in layers.items()})
        return norms

    def record_batch(
        self,
        trainer: L.Trainer,
        record: BatchRecord,
        readings: dict[str, float],
        grad_norms: dict[str, list[float]],
    ) -> None:
        """With `record=true`: every number the guard read of a batch, to divergence/series.jsonl."""
        if self.recording and trainer.is_global_zero:
            line = {
                "step": record.step,
                "epoch": record.epoch,
                "batch_idx": record.batch_idx,
                "values": readings,
                "grad_norms": grad_norms,
                "report": record.report.describe() if record.report is not None else None,
            }
            record_series(trainer, line)

    def record_validation(self, trainer: L.Trainer, step: int) -> None:
        """With `record=true`: the validation's metrics, to divergence/series.jsonl."""
        if self.recording and trainer.is_global_zero:
            values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            record_series(trainer, {"step": step, "val": values})


def record_event(trainer: L.Trainer, event: dict[str, Any]) -> None:
    folder = Path(trainer.default_root_dir) / "divergence"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"events-rank{trainer.global_rank}.jsonl", "a") as f:
        f.write(json.dumps(event) + "\n")
    for logger in trainer.loggers:
        logger.log_metrics({f"divergence/{event['detector']}": 1.0}, step=event["step"])


def record_series(trainer: L.Trainer, line: dict[str, Any]) -> None:
    path = Path(trainer.default_root_dir) / "divergence" / "series.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(line, allow_nan=True) + "\n")


def bundle_size(trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> int:
    """Bytes a bundle of this run takes; sharded, each rank holds a part and the bundle holds them all."""
    size = tensor_bytes([pl_module.state_dict(), [o.state_dict() for o in trainer.optimizers], batch])
    return int(sum_over_shards(trainer, torch.tensor(float(size), device=pl_module.device)))


def write_evidence(
    trainer: L.Trainer,
    event: dict[str, Any],
    *,
    with_bundle: bool,
    pictures: bool,
    history: dict[str, list[tuple[int, float]]],
    layer_norms: dict[str, float],
    **bundle: Any,
) -> list[str]:
    """The bundle (when `with_bundle`; written on every rank, as FSDP gathers the state for rank 0) and the
    picture of `event`, which gains their paths; returns notes for the console."""
    folder = bundle_dir(trainer.default_root_dir, event["step"], event["detector"])
    notes = []
    if with_bundle:
        event["bundle"] = str(folder)
        write_bundle(
            trainer, folder, detection=event, history=history, layer_grad_norms=layer_norms, **bundle
        )
        if trainer.is_global_zero:
            _log_bundle_artifact(trainer, folder)
        notes.append(f"bundle: {folder}")
    if pictures and trainer.is_global_zero:
        title = f"step {event['step']}: {event['reason']}"
        picture = draw_event(folder / "event.png", title, history, event["step"], layer_norms)
        event["picture"] = str(picture)
        _log_picture(trainer, picture, event["step"])
        notes.append(f"picture: {picture}")
    return notes


def _log_bundle_artifact(trainer: L.Trainer, folder: Path) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            artifact = wandb.Artifact(f"divergence-{logger.experiment.id}-{folder.name}", type="divergence")
            artifact.add_dir(str(folder))
            logger.experiment.log_artifact(artifact)


def _log_picture(trainer: L.Trainer, picture: Path, step: int) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image("divergence/event", [str(picture)], step=step)
