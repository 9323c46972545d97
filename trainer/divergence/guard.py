"""The divergence guard: checks every step, acts on what it finds, and keeps the evidence.

What it watches comes from the task's report of each step (trainer/tasks/base.py) and from the gradients each
optimizer is about to apply; the detectors themselves are in detectors.py.

Detectors
- nonfinite: a NaN or Inf in the gradients (checked before each optimizer applies them) or in any number the
  step reports.
- spike: a gradient norm (per network) or a loss far above the median of its recent values (log scale,
  robust spread); in its first values, one far above all before it.
- level: a loss whose recent median has risen far above the best it reached: a run getting worse, and
  staying worse.
- collapse: what only the task's own numbers show: a GAN's discriminator winning outright, its samples'
  diversity falling (at validation), a policy turned deterministic or moved out of its trust region by one
  update, Q-values beyond any possible return.

Actions, per detector (`divergence.<detector>.action`, else `divergence.action`)
- warn: report it, keep going.
- clip (gradient spikes): scale the gradients down to the largest norm the detector would have accepted, as
  adaptive clipping does, and apply the update. Elsewhere it acts as warn.
- skip: drop the update (the optimizer sees no gradients this step). Detections made after the update
  (losses, collapse) cannot drop it and roll back instead.
- rollback: drop the update; when the batch is done, restore the guard's last snapshot (weights, optimizers,
  LR schedulers, the task's own checkpoint state, such as RL's env steps, and under local SGD or DiLoCo the
  last synchronised parameters and the outer optimizer; taken every `rollback.snapshot_every` steps in CPU
  memory), and from then on run every optimizer at
  `rollback.lr_scale`^n of the learning rate its schedule gives (n rollbacks so far; this holds across
  schedulers and tasks that set their own rate, and travels in checkpoints). After `max_rollbacks`, halt.
- halt: save checkpoints/halt-step<K>.ckpt, stop, and exit non-zero with the bundle's path.

A report (the first alarm of a series within `report_every` steps, and every non-finite or collapse one)
writes a bundle (see bundle.py; at most `max_bundle_mb` per run, except a halt's), a picture of the event
(picture.py; also to W&B), a line in <run dir>/divergence/events-rank<r>.jsonl and a warning in the console
and train.log. Later alarms of the same episode still act, and each detector's first of a batch is
recorded in the events file. Under DDP the gradients are already all-reduced and the reported numbers
are averaged over ranks before any test, so every rank takes the same decision. `record=true` also writes
every watched number of every step to divergence/series.jsonl.

Cost: one scalar read per optimizer step (whether to drop an update must be known before it happens) and
one read of the step's report per batch.
"""

import json
import logging
import math
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from trainer.callbacks.gradients import (
    grads,
    layer_name,
    layer_owners,
    params_by_layer,
    per_layer_norms,
    stepped_params,
)
from trainer.callbacks.rng import capture_rng
from trainer.divergence.bundle import bundle_dir, tensor_bytes, to_cpu, write_bundle
from trainer.divergence.detectors import Alarm, CollapseWatch, SeriesWatch
from trainer.divergence.picture import draw_event
from trainer.errors import DivergenceHalt, UserError
from trainer.fsdp import clean_name, is_sharded, sum_over_shards
from trainer.loggers import log_step
from trainer.sync import largest_over_workers, local_sync
from trainer.tasks.base import StepReport, Task, step_data, step_report

log = logging.getLogger(__name__)

ACTIONS = ("warn", "clip", "skip", "rollback", "halt")


class DivergenceGuard(L.Callback):
    def __init__(
        self,
        action: str = "halt",
        nonfinite: dict[str, Any] | None = None,
        spike: dict[str, Any] | None = None,
        level: dict[str, Any] | None = None,
        collapse: dict[str, Any] | None = None,
        rollback: dict[str, Any] | None = None,
        report_every: int = 200,
        max_bundle_mb: float = 200.0,
        pictures: bool = True,
        record: bool = False,
        history: int = 300,
    ):
        settings = {
            "nonfinite": dict(nonfinite or {}),
            "spike": dict(spike or {}),
            "level": dict(level or {}),
            "collapse": dict(collapse or {}),
        }
        self.actions = {name: s.pop("action", None) or action for name, s in settings.items()}
        for name, chosen in self.actions.items():
            if chosen not in ACTIONS:
                raise UserError(f"divergence.{name}.action={chosen} is not one of {', '.join(ACTIONS)}")
        self.enabled = {name: settings[name].pop("enabled", True) for name in ("nonfinite", "collapse")}
        try:
            self.watch = SeriesWatch(settings["spike"], settings["level"])
            self.collapse = CollapseWatch(**settings["collapse"])
        except (TypeError, ValueError) as e:
            raise UserError(f"divergence: {e}") from None
        rollback = dict(rollback or {})
        self.lr_scale = rollback.pop("lr_scale", 0.5)
        self.max_rollbacks = rollback.pop("max_rollbacks", 3)
        self.snapshot_every = rollback.pop("snapshot_every", 100)
        if rollback:
            raise UserError(
                f"divergence.rollback.{next(iter(rollback))} is not an option: "
                "use lr_scale, max_rollbacks, snapshot_every"
            )
        self.report_every, self.max_bundle_bytes = report_every, max_bundle_mb * 2**20
        self.pictures, self.record = pictures, record
        self.rollbacks, self.lr_factor, self.bundle_bytes = 0, 1.0, 0
        self.history: dict[str, deque[tuple[int, float]]] = defaultdict(lambda: deque(maxlen=history))
        self._names: dict[torch.nn.Parameter, str] = {}
        self._batch: Any = None
        self._batch_idx = 0
        self._rng: dict[str, Any] = {}
        self._buffers: list[torch.Tensor] = []
        self._acted_at, self._acted_by = (
            -1,
            set(),
        )  # the last batch that acted, and on which detectors' alarms
        self._rollback_pending = False
        self._quiet_until: dict[str, int] = {}  # an episode of alarms on one series is reported once
        self._snapshot: dict[str, Any] | None = None
        self._hooks: list[Any] = []
        self._saved_lrs: dict[int, list[Any]] = {}
        self._grad_norms: dict[str, list[float]] = defaultdict(list)  # this batch's, for record=true

    @property
    def needs_snapshots(self) -> bool:
        """A rollback may happen: skip becomes rollback when the update is already done."""
        return any(action in ("rollback", "skip") for action in self.actions.values())

    # -- hooks --------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._names = {p: clean_name(n) for n, p in pl_module.named_parameters()}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:  # the rollbacks' learning-rate factor, applied inside each step
            self._hooks += [
                optimizer.register_step_pre_hook(self._scale_lr),
                optimizer.register_step_post_hook(self._restore_lr),
            ]
        if self.needs_snapshots:
            self._take_snapshot(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._snapshot = [], None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch, self._batch_idx = batch, batch_idx
        self._rng = capture_rng()  # small; lets a replay draw the same noise and dropout masks
        # BatchNorm statistics move in the forward pass; a skipped update must not keep a bad batch's.
        buffers = [b for _, b in _float_buffers(pl_module)]
        if buffers and len(self._buffers) == len(buffers):  # (a transformer may have none)
            torch._foreach_copy_(self._buffers, buffers)
        else:
            self._buffers = [b.detach().clone() for b in buffers]

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = stepped_params(optimizer, is_sharded(trainer.strategy))
        if not params:
            return
        # Squared norm per parameter, of the whole parameter under FSDP (each rank holds a part of it).
        squares = sum_over_shards(trainer, torch.stack(torch._foreach_norm(grads(params))).float().square())
        squares = largest_over_workers(trainer, squares)
        total = squares.sum().sqrt().item()  # the one read per optimizer step
        network = self._names.get(params[0], "model").split(".", 1)[0]
        series = f"grad_norm/{network}"
        self._remember(trainer, series, total)
        if not math.isfinite(total):
            if (
                self.enabled["nonfinite"] and trainer.precision != "16-mixed"
            ):  # fp16's scaler skips these itself
                bad = [
                    self._names.get(p, "?") for p, n in zip(params, squares.tolist()) if not math.isfinite(n)
                ]
                layers = sorted({layer_name(name) for name in bad})
                self._detect(
                    trainer,
                    pl_module,
                    "nonfinite",
                    series,
                    f"non-finite gradients in {network} "
                    f"({len(layers)} layers: {', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''})",
                    total,
                    optimizer,
                )
            return
        for kind, alarm in self.watch.update(series, total, loss=False):
            self._detect(
                trainer,
                pl_module,
                kind,
                series,
                f"gradient norm of {network} is {total:.4g}, {alarm.describe()}",
                total,
                optimizer,
                alarm,
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        report = step_report(pl_module, outputs)
        readings = self._check_report(trainer, pl_module, report) if report is not None else {}
        if self.record and trainer.is_global_zero:
            self._write_record(
                trainer,
                {
                    "step": log_step(trainer),
                    "epoch": trainer.current_epoch,
                    "batch_idx": batch_idx,
                    "values": readings,
                    "grad_norms": self._grad_norms,
                    "report": report.describe() if report is not None else None,
                },
            )
        self._grad_norms = defaultdict(list)
        if self._rollback_pending:
            self._rollback_pending = False
            self._rollback(trainer, pl_module)
        elif (
            self.needs_snapshots
            and self._acted_at != log_step(trainer)
            and (log_step(trainer) + 1) % self.snapshot_every == 0
        ):
            self._take_snapshot(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self.record and trainer.is_global_zero:
            values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self._write_record(trainer, {"step": log_step(trainer), "val": values})
        report = pl_module.validation_report if isinstance(pl_module, Task) else None
        diversity = report.sample_diversity if report is not None else None
        if (
            diversity is not None
            and self.enabled["collapse"]
            and (reason := self.collapse.validation(diversity))
        ):
            self._detect(trainer, pl_module, "collapse", "sample_diversity", reason, diversity)
            if self._rollback_pending:  # no step is under way: go back now
                self._rollback_pending = False
                self._rollback(trainer, pl_module)

    def watch_outer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, norm: float, local_steps: int
    ) -> None:
        """Local SGD / DiLoCo (trainer/sync.py): the norm of the workers' average change since the last sync,
        the same number on every worker; a non-finite one was not applied. Syncs before a validation come
        after fewer steps than H, so what the spike detector compares is the change per local step."""
        series = "outer/change_per_step"
        per_step = norm / max(1, local_steps)
        self._remember(trainer, series, per_step)
        if not math.isfinite(norm):
            if self.enabled["nonfinite"]:
                reason = f"the workers' average change since the last sync is {norm} (dropped)"
                self._detect(trainer, pl_module, "nonfinite", series, reason, norm)
            return
        for kind, alarm in self.watch.update(series, per_step, loss=False):
            reason = f"the workers' average change per local step is {per_step:.4g}, {alarm.describe()}"
            self._detect(trainer, pl_module, kind, series, reason, per_step, alarm=alarm)

    # -- checks -------------------------------------------------------------------------------------

    def _check_report(
        self, trainer: L.Trainer, pl_module: L.LightningModule, report: StepReport
    ) -> dict[str, float]:
        """Checks the step's reported numbers, read once (and averaged over ranks); returns them."""
        scalars = report.scalars()
        values = torch.stack([v.float().reshape(()) for v in scalars.values()])
        if trainer.world_size > 1:
            values = trainer.strategy.reduce(values, reduce_op="mean")  # the same numbers on every rank
        readings = dict(zip(scalars, values.tolist()))
        for name, value in readings.items():
            self._remember(trainer, name, value)
        broken = [name for name, value in readings.items() if not math.isfinite(value)]
        if broken and self.enabled["nonfinite"]:
            name = next((n for n in broken if n in report.losses), broken[0])
            self._detect(
                trainer,
                pl_module,
                "nonfinite",
                name,
                f"{', '.join(broken)} {'is' if len(broken) == 1 else 'are'} {readings[name]}",
                readings[name],
            )
            return readings
        for name in report.losses:
            for kind, alarm in self.watch.update(name, readings[name], loss=True):
                self._detect(
                    trainer,
                    pl_module,
                    kind,
                    name,
                    f"{name} is {readings[name]:.4g}, {alarm.describe()}",
                    readings[name],
                    alarm=alarm,
                )
        if self.enabled["collapse"] and (collapsed := self.collapse.step(report, readings)) is not None:
            series, reason = collapsed
            self._detect(trainer, pl_module, "collapse", series, reason, readings[series])
        return readings

    def _remember(self, trainer: L.Trainer, series: str, value: float) -> None:
        self.history[series].append((log_step(trainer), value))
        if self.record and series.startswith("grad_norm/"):
            self._grad_norms[series.removeprefix("grad_norm/")].append(value)

    # -- acting -------------------------------------------------------------------------------------

    def _detect(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        detector: str,
        series: str,
        reason: str,
        value: float,
        optimizer: torch.optim.Optimizer | None = None,
        alarm: Alarm | None = None,
    ) -> None:
        step = log_step(trainer)
        if step != self._acted_at:
            self._acted_at, self._acted_by = step, set()
        first = detector not in self._acted_by
        if not first and optimizer is None:
            return  # this detector has acted on the batch already: a NaN gradient also makes the loss NaN
        self._acted_by.add(detector)
        action = self.actions[detector]
        if action == "clip" and (optimizer is None or alarm is None):
            action = "warn"  # only a gradient about to be applied can be clipped
        if action == "skip" and optimizer is None:
            action = "rollback"  # the update has happened; the way back is the last snapshot
        if action == "rollback" and self.rollbacks >= self.max_rollbacks:
            action, reason = "halt", f"{reason}; {self.max_rollbacks} rollbacks did not help"
        # Every alarm acts; each detector's first of a batch is recorded, and reported unless its episode was.
        episodic = detector in ("spike", "level")
        reported = action == "halt" or (first and (not episodic or step >= self._quiet_until.get(series, 0)))
        if episodic and reported:
            self._quiet_until[series] = step + self.report_every
        event = {
            "detector": detector,
            "series": series,
            "reason": reason,
            "value": value,
            "step": step,
            "action": action,
            "reported": reported,
            "global_step": trainer.global_step,
            "lr_factor": self.lr_factor,
            "optimizer_index": next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), None),
            **({"limit": alarm.limit} if alarm is not None and math.isfinite(alarm.limit) else {}),
        }
        if reported:
            self._report(trainer, pl_module, event, action, optimizer)
        if first or reported:
            self._record_event(trainer, event)
        if action == "clip":
            grads = [
                p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
            ]
            torch._foreach_mul_(grads, alarm.limit / value)
        elif action in ("skip", "rollback"):
            _drop_update(optimizer)
            self._restore_buffers(pl_module, optimizer)
            # Weights change only when the batch is done: the rest of this step's graph still needs them.
            self._rollback_pending |= action == "rollback"
        elif action == "halt":
            halt_checkpoint = Path(trainer.default_root_dir) / "checkpoints" / f"halt-step{step:06d}.ckpt"
            trainer.save_checkpoint(halt_checkpoint, weights_only=False)
            raise DivergenceHalt(
                f"divergence at step {step}: {reason}. Stopped (divergence.{detector}.action=halt); "
                f"bundle: {event.get('bundle')}; replay it with: python -m trainer.replay "
                f"{event.get('bundle')}"
            )

    def _report(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        event: dict[str, Any],
        action: str,
        optimizer: torch.optim.Optimizer | None,
    ) -> None:
        """The evidence: bundle (within the size cap), picture, and a warning."""
        step, detector = event["step"], event["detector"]
        folder = bundle_dir(trainer.default_root_dir, step, detector)
        # Before an update, the gradients it was about to apply; after it, all the model holds.
        layer_norms = self._layer_grad_norms(
            trainer, [optimizer] if optimizer is not None else trainer.optimizers
        )
        history = {name: list(points) for name, points in self.history.items()}
        batch = step_data(pl_module, self._batch)
        size = tensor_bytes([pl_module.state_dict(), [o.state_dict() for o in trainer.optimizers], batch])
        # Sharded, each rank holds a part and the bundle holds them all.
        size = int(sum_over_shards(trainer, torch.tensor(float(size), device=pl_module.device)))
        notes = []
        if action == "halt" or self.bundle_bytes + size <= self.max_bundle_bytes:
            self.bundle_bytes += size
            event["bundle"] = str(folder)
            names = [name for name, _ in _float_buffers(pl_module)]
            write_bundle(  # on every rank: under FSDP they gather the whole state for rank 0 to write
                trainer,
                folder,
                detection=event,
                batch=batch,
                rng=self._rng,
                batch_idx=self._batch_idx,
                buffers_at_start=dict(zip(names, self._buffers)),
                history=history,
                layer_grad_norms=layer_norms,
            )
            if trainer.is_global_zero:
                _log_bundle_artifact(trainer, folder)
            notes.append(f"bundle: {folder}")
        else:
            notes.append(f"no bundle: divergence.max_bundle_mb={self.max_bundle_bytes / 2**20:g} reached")
        if self.pictures and trainer.is_global_zero:
            picture = draw_event(
                folder / "event.png", f"step {step}: {event['reason']}", history, step, layer_norms
            )
            event["picture"] = str(picture)
            _log_picture(trainer, picture, step)
            notes.append(f"picture: {picture}")
        if trainer.is_global_zero:
            log.warning(f"divergence at step {step} ({action}): {event['reason']} ({'; '.join(notes)})")

    def _layer_grad_norms(
        self, trainer: L.Trainer, optimizers: list[torch.optim.Optimizer]
    ) -> dict[str, float]:
        """Per-layer norms of the gradients the optimizers hold: those of the step that went wrong."""
        layer_of = {p: layer_name(n) for p, n in self._names.items()}
        sharded = is_sharded(trainer.strategy)
        layers = {
            name: ps for opt in optimizers for name, ps in params_by_layer(opt, layer_of, sharded).items()
        }
        if not layers:
            return {}
        params = [p for ps in layers.values() for p in ps]
        owners = layer_owners(layers, params[0].device)
        norms = per_layer_norms(grads(params), owners, len(layers), trainer)
        return dict(zip(layers, norms.tolist()))

    def _restore_buffers(self, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer | None) -> None:
        """Puts back the BatchNorm statistics that the bad batch moved: of the network whose update is
        dropped (its forward pass is over; another network's graph may still need its own), or of all."""
        owned = (
            {self._names.get(p, "").split(".", 1)[0] for g in optimizer.param_groups for p in g["params"]}
            if optimizer is not None
            else None
        )
        pairs = [
            (b, saved)
            for (name, b), saved in zip(_float_buffers(pl_module), self._buffers)
            if owned is None or name.split(".", 1)[0] in owned
        ]
        if pairs:
            torch._foreach_copy_([b for b, _ in pairs], [saved for _, saved in pairs])

    # -- rollback -----------------------------------------------------------------------------------

    def _take_snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """What a rollback restores, copied to CPU memory: what a checkpoint holds of the model, the
        optimizers and schedulers, and the task's own state (its `on_save_checkpoint`)."""
        state = {
            "state_dict": pl_module.state_dict(),
            "optimizer_states": [o.state_dict() for o in trainer.optimizers],
            "lr_schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
        }
        pl_module.on_save_checkpoint(state)
        sync = local_sync(trainer)
        state["worker_sync"] = sync.rollback_state(trainer) if sync is not None else None
        self._snapshot = {**to_cpu(state), "step": log_step(trainer)}

    def _rollback(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        snapshot = self._snapshot
        if snapshot is None:
            log.warning("divergence rollback: no snapshot to go back to, dropping the update only")
            return
        pl_module.load_state_dict(snapshot["state_dict"])
        for optimizer, state in zip(trainer.optimizers, to_cpu(snapshot["optimizer_states"])):  # (a copy: the
            optimizer.load_state_dict(
                state
            )  # optimizer would otherwise update the snapshot's tensors in place)
        for config, state in zip(trainer.lr_scheduler_configs, snapshot["lr_schedulers"]):
            config.scheduler.load_state_dict(state)
        pl_module.on_load_checkpoint(to_cpu(snapshot))
        if snapshot["worker_sync"] is not None:  # local SGD, DiLoCo: back to that step's last sync, too
            local_sync(trainer).roll_back(trainer, snapshot["worker_sync"])
        self.watch.restart()
        self.collapse.restart()
        self.rollbacks += 1
        self.lr_factor = self.lr_scale**self.rollbacks
        for logger in trainer.loggers:
            logger.log_metrics({"divergence/lr_factor": self.lr_factor}, step=log_step(trainer))
        if trainer.is_global_zero:
            log.warning(
                f"divergence rollback {self.rollbacks}: back to the state of step {snapshot['step']}; "
                f"learning rates now x{self.lr_factor:g} of their schedule"
            )

    def _scale_lr(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        if self.lr_factor != 1.0:
            self._saved_lrs[id(optimizer)] = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * self.lr_factor

    def _restore_lr(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        for group, lr in zip(optimizer.param_groups, self._saved_lrs.pop(id(optimizer), [])):
            group["lr"] = lr

    # -- records ------------------------------------------------------------------------------------

    def _record_event(self, trainer: L.Trainer, event: dict[str, Any]) -> None:
        folder = Path(trainer.default_root_dir) / "divergence"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"events-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")
        for logger in trainer.loggers:
            logger.log_metrics({f"divergence/{event['detector']}": 1.0}, step=event["step"])

    def _write_record(self, trainer: L.Trainer, line: dict[str, Any]) -> None:
        path = Path(trainer.default_root_dir) / "divergence" / "series.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(line, allow_nan=True) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {
            "rollbacks": self.rollbacks,
            "lr_factor": self.lr_factor,
            "bundle_bytes": self.bundle_bytes,
            "watch": self.watch.state_dict(),
            "collapse": self.collapse.state_dict(),
            "quiet_until": self._quiet_until,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollbacks, self.lr_factor = state["rollbacks"], state["lr_factor"]
        self.bundle_bytes, self._quiet_until = state["bundle_bytes"], dict(state["quiet_until"])
        self.collapse.load_state_dict(state["collapse"])
        self.watch.load_state_dict(state["watch"])


def _float_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(clean_name(name), b) for name, b in module.named_buffers() if b.is_floating_point()]


def divergence_callbacks(settings: dict[str, Any] | None) -> list[L.Callback]:
    """The guard, and the fault injector when `inject.step` is set, from the `divergence` config node."""
    settings = dict(settings or {})
    if not settings.pop("enabled", True):
        return []
    inject = settings.pop("inject", None) or {}
    try:
        callbacks: list[L.Callback] = [DivergenceGuard(**settings)]
        if inject.get("step") is not None:
            from trainer.divergence.inject import FaultInjector

            callbacks.insert(0, FaultInjector(**inject))
    except TypeError as e:
        raise UserError(f"divergence: {e}") from None
    return callbacks


def _drop_update(optimizer: torch.optim.Optimizer | None) -> None:
    """Parameters without a gradient are left alone by torch's optimizers, moments included."""
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None


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
