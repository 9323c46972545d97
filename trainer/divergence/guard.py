"""The divergence guard: checks every step, acts on what it finds, and keeps the evidence.

What it watches comes from the gradients each optimizer is about to apply and from the task's report of
each step (trainer/tasks/base.py). The guard wires Lightning's hooks to its parts: its settings
(settings.py), the detectors (detectors.py, collapse.py) and what they find (detection.py), what an alarm
does (policy.py), the way back (rollback.py) and the evidence (evidence.py).

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
- skip: drop the update. Detections made after the update (losses, collapse) cannot drop it and roll back
  instead. A dropped update's BatchNorm statistics are put back.
- rollback: drop the update; restore the guard's last snapshot (weights, optimizers, LR schedulers, the task's
  own checkpoint state, such as RL's env steps, and under local SGD or DiLoCo the last synchronised
  parameters and the outer optimizer; taken every `rollback.snapshot_every` steps), and from then on run every
  optimizer at `rollback.lr_scale`^n of the learning rate its schedule gives (n rollbacks so far; this holds
  across schedulers and tasks that set their own rate, and travels in checkpoints). After `max_rollbacks`,
  halt.
- halt: save checkpoints/halt-step<K>.ckpt, stop, and exit non-zero with the bundle's path.
A non-finite update is never applied, whatever the action.

The host never waits for the device in a training step (trainer/perf/profiling.py counts it): what must happen
before an update (measuring the gradients, dropping or clipping the update) is decided on the device
(gate.py), and every number the guard watches is copied to the host as the device goes on and read one batch
later (trainer/perf/readout.py). So an alarm is reported, and a rollback or halt carried out, at the end of
the batch after the one that raised it; a rollback or halt alarm freezes the model on the device until then,
so that it goes back to, or stops at, the state before the bad update. After a warn or clip alarm the run goes
on, and its bundle holds the weights of the batch after it (with the batch, RNG state and BatchNorm statistics
of its own). Checkpoints are written only from states the guard has read (`settle`).

A report (the first alarm of a series within `report_every` steps, and every non-finite or collapse one)
writes a bundle (see bundle.py; at most `max_bundle_mb` per run, except a halt's), a picture of the event
(picture.py; also to W&B), a line in <run dir>/divergence/events-rank<r>.jsonl and a warning in the console
and train.log. Later alarms of the same episode still act, and each detector's first of a batch is recorded
in the events file. Under DDP the gradients are already all-reduced and the reported numbers are averaged
over ranks before any test, so every rank takes the same decision. `record=true` also writes every watched
number of every step to divergence/series.jsonl.
"""

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from trainer.callbacks.rng import capture_rng
from trainer.config.build import build_settings
from trainer.distributed.fsdp import clean_name
from trainer.divergence.detection import Detection
from trainer.divergence.evidence import Evidence
from trainer.divergence.gate import UpdateGate, forget_skip, skip_update
from trainer.divergence.policy import ActionPolicy, detector_actions
from trainer.divergence.records import BatchRecord, Finding
from trainer.divergence.rollback import Rollback, restore_buffers
from trainer.divergence.settings import DivergenceSettings
from trainer.errors import DivergenceHalt
from trainer.lightning_internals import log_step
from trainer.perf.readout import DelayedReadout
from trainer.tasks.base import Task, step_data, step_report

log = logging.getLogger(__name__)


class DivergenceGuard(L.Callback):
    def __init__(self, settings: DivergenceSettings):
        self.actions = detector_actions(settings)
        self.evidence = Evidence(settings.history, settings.max_bundle_mb, settings.pictures, settings.record)
        self.detection = Detection(settings, remember=self.evidence.remember)
        self.rollback = Rollback(settings.rollback)
        self.policy = ActionPolicy(self.actions, settings.rollback.max_rollbacks, settings.report_every)
        self.gate: UpdateGate | None = None  # made in setup, when the precision is known
        self.readout: DelayedReadout[BatchRecord] = DelayedReadout()
        self.names: dict[torch.nn.Parameter, str] = {}
        self._batch: BatchRecord | None = None
        self._batches = 0  # batches begun; its parity picks the buffer slot and the gate's freeze flag
        self._rollback_pending = False  # an alarm outside a batch's readout (a sync) asked for one
        self._hooks: list[Any] = []

    @property
    def needs_snapshots(self) -> bool:
        """A rollback may happen: skip becomes rollback when the update is already done."""
        return any(action in ("rollback", "skip") for action in self.actions.values())

    # -- hooks --------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # (the gate, the detectors' reasons and the reports' per-layer norms name parameters alike)
        self.names = self.evidence.names = {p: clean_name(n) for n, p in pl_module.named_parameters()}
        # fp16's loss scaler skips non-finite updates itself
        check_nonfinite = self.detection.nonfinite and trainer.precision != "16-mixed"
        self.gate = UpdateGate(check_nonfinite, *(self.actions[d] for d in ("nonfinite", "spike", "blowup")))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            self._hooks += [
                *self.rollback.lr_hooks(optimizer),
                optimizer.register_step_post_hook(forget_skip),
            ]
        assert self.gate is not None
        for series in self.detection.watch.detectors["spike"]:  # a resumed run's limits
            self.gate.limit_tensors(series, pl_module.device)
        self._update_limits(self.detection.watch.detectors["spike"])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            self.settle(trainer, pl_module)
        finally:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            self.rollback.snapshots.clear()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self.gate is not None
        self.gate.start_batch(pl_module.device)
        parity = self._batches % 2
        buffers = self.rollback.save_buffers(pl_module, parity)
        self._batch = BatchRecord(
            step=log_step(trainer),
            epoch=trainer.current_epoch,
            batch_idx=batch_idx,
            data=batch,
            rng=capture_rng(),  # small; lets a replay draw the same noise and dropout masks
            buffers=buffers,
            parity=parity,
            limits=dict(self.gate.host_limits),
            lrs=[[group["lr"] for group in opt.param_groups] for opt in trainer.optimizers],
        )

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        assert self.gate is not None
        skip = self.gate.step(trainer, optimizer, self.names, self._batches % 2)
        if skip is not None:
            skip_update(optimizer, skip, getattr(trainer.precision_plugin, "scaler", None))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self.gate is not None and self._batch is not None
        record, self._batch = self._batch, None
        self._batches += 1
        record.data = step_data(pl_module, batch)
        record.gate_steps, record.report = self.gate.steps, step_report(pl_module, outputs)
        values = record.values(trainer, pl_module.device)
        rolled_back = any(self._read(trainer, pl_module, *done) for done in self.readout.put(values, record))
        if self._rollback_pending:
            self._rollback_pending = False
            rolled_back = self._roll_back(trainer, pl_module) or rolled_back
        if self.needs_snapshots and not rolled_back:
            self.rollback.snapshot_if_due(trainer, pl_module, record.step)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.settle(trainer, pl_module)  # validate weights the guard has read

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.settle(trainer, pl_module)
        if (finding := self.detection.epoch_end(trainer.current_epoch, log_step(trainer))) is not None:
            self._act_now(trainer, pl_module, finding)

    def settle(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Reads and acts on every batch still in flight (the host waits for the device): before a
        checkpoint, a validation, the end of an epoch or of training."""
        for done in self.readout.drain():
            if self._read(trainer, pl_module, *done):
                break

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        step = log_step(trainer)
        self.evidence.record_validation(trainer, step)
        report = pl_module.validation_report if isinstance(pl_module, Task) else None
        diversity = report.sample_diversity if report is not None else None
        for finding in self.detection.validation(trainer.callback_metrics, diversity, step):
            self._act_now(trainer, pl_module, finding)

    def watch_outer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, norm: float, local_steps: int
    ) -> None:
        """Local SGD / DiLoCo (trainer/distributed/sync.py): the norm of the workers' average change since the
        last sync, the same number on every worker."""
        for finding in self.detection.outer_step(log_step(trainer), norm, local_steps):
            self._act(trainer, pl_module, finding)

    # -- reading a batch ----------------------------------------------------------------------------

    def _read(
        self, trainer: L.Trainer, pl_module: L.LightningModule, record: BatchRecord, values: list[float]
    ) -> bool:
        """Checks a batch's numbers, now on the host, and acts on them; True if it rolled back (the batches
        after it belong to a trajectory that is gone, and are not read)."""
        assert self.gate is not None
        rollbacks = self.rollback.count
        steps, readings = record.readings(values)
        grad_norms: dict[str, list[float]] = defaultdict(list)
        for gate_step, norm, _ in steps:
            grad_norms[gate_step.series.removeprefix("grad_norm/")].append(norm)
            found = self.detection.gradient(record, gate_step, norm, self.names, self.gate.check_nonfinite)
            for finding in found:
                self._act(trainer, pl_module, finding)
            if self.rollback.count != rollbacks:
                return True
        self._update_limits({s.series for s in record.gate_steps})  # for the batches from the next but one
        if record.report is not None:
            for finding in self.detection.report(record, readings):
                self._act(trainer, pl_module, finding)
            if self.rollback.count != rollbacks:
                return True
        self.evidence.record_batch(trainer, record, readings, grad_norms)
        if dropped := {s.series.removeprefix("grad_norm/") for s, _, skipped in steps if skipped}:
            restore_buffers(pl_module, record.buffers, dropped)
        self.gate.thaw(record.parity)
        if self.policy.acted_at != record.step:  # a snapshot taken at its end is of a healthy state
            self.rollback.snapshots.confirm(record.step)
        return False

    def _update_limits(self, series: Iterable[str]) -> None:
        """The gate's spike and blow-up limits of each of `series`, as the detectors now say."""
        assert self.gate is not None
        for name in series:
            self.gate.set_limits(name, *self.detection.watch.limits(name))

    # -- acting -------------------------------------------------------------------------------------

    def _act(self, trainer: L.Trainer, pl_module: L.LightningModule, finding: Finding) -> None:
        """Decides what an alarm does (the gate has already dropped or clipped a gradient alarm's update on
        the device), keeps its evidence, and carries out a rollback or a halt."""
        decision = self.policy.decide(
            finding.detector,
            finding.series,
            finding.step,
            finding.reason,
            before_update=finding.gate_step is not None,
            clippable=finding.alarm is not None,
            rollbacks=self.rollback.count,
        )
        if decision is None:
            return
        event, notes = self.evidence.record(trainer, pl_module, finding, decision, self.rollback.lr_factor)
        if notes is not None and trainer.is_global_zero:
            what = f"divergence at step {event['step']} ({event['action']}): {event['reason']}"
            log.warning(f"{what} ({'; '.join(notes)})")
        if decision.action == "rollback" and finding.record is None:
            self._rollback_pending = True  # (at a sync, within an optimizer step: at the batch's end)
        elif decision.action == "rollback":
            self._roll_back(trainer, pl_module)
        elif decision.action == "halt":
            self._halt(trainer, pl_module, event, finding)

    def _act_now(self, trainer: L.Trainer, pl_module: L.LightningModule, finding: Finding) -> None:
        """An alarm between batches (an epoch's end, a validation): a rollback happens at once."""
        self._act(trainer, pl_module, finding)
        if self._rollback_pending:
            self._rollback_pending = False
            self._roll_back(trainer, pl_module)

    def _roll_back(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Back to the last confirmed snapshot; False when there is none (the update is dropped only)."""
        assert self.gate is not None
        self.readout.discard()
        self.gate.thaw()
        step = self.rollback.restore(trainer, pl_module)
        if step is None:
            log.warning("divergence rollback: no snapshot to go back to, dropping the update only")
            return False
        self.detection.restart()
        self._update_limits(self.detection.watch.detectors["spike"])
        if trainer.is_global_zero:
            log.warning(
                f"divergence rollback {self.rollback.count}: back to the state of step {step}; "
                f"learning rates now x{self.rollback.lr_factor:g} of their schedule"
            )
        return True

    def _halt(
        self, trainer: L.Trainer, pl_module: L.LightningModule, event: dict[str, Any], finding: Finding
    ) -> None:
        if finding.record is not None and finding.gate_step is not None:
            # The gate froze the model before the bad update; its batch statistics are put back too.
            restore_buffers(pl_module, finding.record.buffers)
        step, detector = event["step"], event["detector"]
        halt_checkpoint = Path(trainer.default_root_dir) / "checkpoints" / f"halt-step{step:06d}.ckpt"
        trainer.save_checkpoint(halt_checkpoint, weights_only=False)
        raise DivergenceHalt(
            f"divergence at step {step}: {event['reason']}. Stopped (divergence.{detector}.action=halt); "
            f"bundle: {event.get('bundle')}; replay it with: python -m trainer.replay {event.get('bundle')}"
        )

    # -- checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.rollback.state_dict(),
            "bundle_bytes": self.evidence.bundle_bytes,
            **self.detection.state_dict(),
            "quiet_until": self.policy.quiet_until,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollback.load_state_dict(state)
        self.evidence.bundle_bytes, self.policy.quiet_until = (
            state["bundle_bytes"],
            dict(state["quiet_until"]),
        )
        self.detection.load_state_dict(state)


def divergence_verdict(trainer: L.Trainer) -> str | None:
    """Why the run's guard judged the run failed when training ended (None: it did not, or no guard)."""
    callbacks = trainer.callbacks  # pyright: ignore[reportAttributeAccessIssue]  # set by Lightning
    guard = next((cb for cb in callbacks if isinstance(cb, DivergenceGuard)), None)
    return guard.detection.verdict() if guard is not None else None


def divergence_callbacks(node: Mapping[str, Any] | None) -> list[L.Callback]:
    """The guard, and the fault injector when `inject.step` is set, from the `divergence` config node (as
    plain data)."""
    settings = build_settings(DivergenceSettings, node, "divergence")
    if not settings.enabled:
        return []
    callbacks: list[L.Callback] = [DivergenceGuard(settings)]
    if settings.inject.step is not None:
        from trainer.divergence.inject import FaultInjector

        callbacks.insert(0, FaultInjector(**asdict(settings.inject)))
    return callbacks
