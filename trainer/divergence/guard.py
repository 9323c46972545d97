"""The divergence guard: checks every step, acts on what it finds, and keeps the evidence.

Detectors
- nonfinite: a NaN or Inf in the gradients (checked before each optimizer applies them) or in a loss.
- spike: a gradient norm (per network) or a loss more than `z_threshold` standard deviations above its
  rolling window (after `warmup` steps).
- collapse (GANs): the discriminator wins outright for `steps` steps in a row.

Actions, per detector (`divergence.<detector>.action`, else `divergence.action`)
- warn: log it, keep going.
- skip: drop the update (the optimizer sees no gradients this step). Detections made after the update
  (a loss, collapse) cannot drop it and roll back instead.
- rollback: drop the update, and when the batch is done reload the last good checkpoint (weights and
  optimizer), scale the learning rates by `rollback.lr_scale`, and carry on with the next batch; after
  `rollback.max_rollbacks`, halt.
- halt: save checkpoints/halt-step<K>.ckpt, stop, and exit non-zero with the bundle's path.

Every detection writes a bundle (up to `max_bundles`; see bundle.py), logs `divergence/<detector>` and
appends a line to <run dir>/divergence/events-rank<r>.jsonl. Under DDP the gradients are already all-reduced
and the losses are averaged over ranks before any test, so every rank takes the same decision.

Cost: one scalar read per optimizer step (whether to drop an update must be known before it happens) and
one read of the step's losses per batch.
"""

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from trainer.callbacks.rng import capture_rng
from trainer.checkpoint import load_checkpoint_file
from trainer.divergence.bundle import bundle_dir, write_bundle
from trainer.divergence.detectors import CollapseDetector, RollingZScore
from trainer.errors import UserError
from trainer.loggers import log_step

ACTIONS = ("warn", "skip", "rollback", "halt")


class DivergenceHalt(UserError):
    """Training stopped on purpose by the guard; the message names the bundle to replay."""


class DivergenceGuard(L.Callback):
    def __init__(
        self,
        action: str = "halt",
        nonfinite: dict[str, Any] | None = None,
        spike: dict[str, Any] | None = None,
        collapse: dict[str, Any] | None = None,
        rollback: dict[str, Any] | None = None,
        max_bundles: int = 3,
    ):
        settings = {"nonfinite": nonfinite or {}, "spike": spike or {}, "collapse": collapse or {}}
        self.actions = {name: s.get("action") or action for name, s in settings.items()}
        for name, chosen in self.actions.items():
            if chosen not in ACTIONS:
                raise UserError(f"divergence.{name}.action={chosen} is not one of {', '.join(ACTIONS)}")
        self.enabled = {name: s.get("enabled", True) for name, s in settings.items()}
        spike_args = {k: v for k, v in settings["spike"].items() if k in ("window", "warmup", "patience")}
        if "z_threshold" in settings["spike"]:
            spike_args["threshold"] = settings["spike"]["z_threshold"]
        self.spikes: dict[str, RollingZScore] = defaultdict(lambda: RollingZScore(**spike_args))
        collapse_args = {k: v for k, v in settings["collapse"].items() if k not in ("enabled", "action")}
        self.collapse = CollapseDetector(**collapse_args)
        rollback = rollback or {}
        self.lr_scale = rollback.get("lr_scale", 0.5)
        self.max_rollbacks = rollback.get("max_rollbacks", 3)
        self.max_bundles = max_bundles
        self.rollbacks = 0
        self.bundles_written = 0
        self._names: dict[torch.nn.Parameter, str] = {}
        self._batch: Any = None
        self._batch_idx = 0
        self._rng: dict[str, Any] = {}
        self._buffers: list[torch.Tensor] = []
        self._acted_at = -1
        self._rollback_pending = False
        self._quiet_until: dict[str, int] = {}  # a spike episode is reported once per window

    # -- hooks --------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._names = {p: n for n, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch, self._batch_idx = batch, batch_idx
        self._rng = capture_rng()  # small; lets a replay draw the same noise and dropout masks
        # BatchNorm statistics move in the forward pass; a skipped update must not keep a bad batch's.
        buffers = [b for _, b in _float_buffers(pl_module)]
        if buffers and len(self._buffers) == len(buffers):  # (a transformer may have none)
            torch._foreach_copy_(self._buffers, buffers)
        else:
            self._buffers = [b.detach().clone() for b in buffers]

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        norms = torch.stack(torch._foreach_norm([p.grad for p in params]))
        total = torch.linalg.vector_norm(norms, dtype=torch.float32).item()  # the one read per optimizer step
        network = self._names.get(params[0], "model").split(".", 1)[0]
        if not math.isfinite(total):
            if self.enabled["nonfinite"] and trainer.precision != "16-mixed":  # fp16's scaler skips these itself
                bad = [self._names.get(p, "?") for p, n in zip(params, norms.tolist()) if not math.isfinite(n)]
                layers = sorted({name.rpartition(".")[0] for name in bad})
                self._detect(trainer, pl_module, "nonfinite", f"non-finite gradients in {network} "
                             f"({len(layers)} layers: {', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''})", total, optimizer)
            return
        z = self._spike(trainer, f"grad_norm/{network}", total)
        if z is not None:
            window = self.spikes[f"grad_norm/{network}"].window
            self._detect(trainer, pl_module, "spike", f"gradient norm of {network} is {total:.4g}, "
                         f"{z:.1f} standard deviations above its last {window} steps", total, optimizer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._check_signals(trainer, pl_module, outputs)
        if self._rollback_pending:
            self._rollback_pending = False
            self._rollback(trainer, pl_module)

    def _check_signals(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any) -> None:
        signals = step_signals(pl_module, outputs)
        if not signals:
            return
        values = torch.stack([v.detach().float().reshape(()) for v in signals.values()])
        if trainer.world_size > 1:
            values = trainer.strategy.reduce(values, reduce_op="mean")  # the same numbers on every rank
        readings = dict(zip(signals, values.tolist()))
        for name, value in readings.items():
            if not name.startswith("loss"):
                continue
            if not math.isfinite(value):
                if self.enabled["nonfinite"]:
                    self._detect(trainer, pl_module, "nonfinite", f"{name} is {value}", value)
            elif (z := self._spike(trainer, name, value)) is not None:
                self._detect(trainer, pl_module, "spike", f"{name} is {value:.4g}, {z:.1f} standard deviations "
                             f"above its last {self.spikes[name].window} steps", value)
        if self.enabled["collapse"] and {"loss_d", "D_x", "D_G_z"} <= readings.keys():
            if self.collapse.update(readings["loss_d"], readings["D_x"], readings["D_G_z"]):
                self._detect(trainer, pl_module, "collapse", f"the discriminator has won for "
                             f"{self.collapse.steps} steps (D(x)={readings['D_x']:.3f}, "
                             f"D(G(z))={readings['D_G_z']:.3f}): mode collapse", readings["loss_d"])
                self.collapse.streak = 0

    def _spike(self, trainer: L.Trainer, series: str, value: float) -> float | None:
        """The z-score if `value` spikes and this series has not reported a spike within its window."""
        if not self.enabled["spike"]:
            return None
        z = self.spikes[series].update(value)
        step = log_step(trainer)
        if z is None or step < self._quiet_until.get(series, 0):
            return None
        self._quiet_until[series] = step + self.spikes[series].window
        return z

    # -- acting -------------------------------------------------------------------------------------

    def _detect(self, trainer: L.Trainer, pl_module: L.LightningModule, detector: str, reason: str,
                value: float, optimizer: torch.optim.Optimizer | None = None) -> None:
        step = log_step(trainer)
        if step == self._acted_at:
            return  # one action per batch: a NaN gradient also makes the loss NaN
        self._acted_at = step
        action = self.actions[detector]
        if action == "skip" and optimizer is None:
            action = "rollback"  # the update has happened; the way back is the last checkpoint
        if action == "rollback" and self.rollbacks >= self.max_rollbacks:
            action, reason = "halt", f"{reason}; {self.max_rollbacks} rollbacks did not help"
        folder = bundle_dir(trainer.default_root_dir, step, detector)
        optimizer_index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), None)
        detection = {"detector": detector, "reason": reason, "value": value, "step": step, "action": action,
                     "optimizer_index": optimizer_index, "global_step": trainer.global_step}
        if self.bundles_written < self.max_bundles or action == "halt":
            self.bundles_written += 1
            if trainer.is_global_zero:
                names = [name for name, _ in _float_buffers(pl_module)]
                # An RL step collects its own data and names it `step_batch`; other tasks train on the batch.
                batch = getattr(pl_module, "step_batch", None) or self._batch
                write_bundle(trainer, pl_module, folder, detection=detection, batch=batch, rng=self._rng,
                             batch_idx=self._batch_idx, buffers_at_start=dict(zip(names, self._buffers)))
                _log_bundle_artifact(trainer, folder)
            detection["bundle"] = str(folder)
        self._record(trainer, detection)
        message = f"divergence at step {step}: {reason}"
        if action == "warn":
            rank_zero_warn(f"{message} (bundle: {folder})")
        elif action in ("skip", "rollback"):
            _drop_update(optimizer)
            self._restore_buffers(pl_module, optimizer)
            # Weights change only when the batch is done: the rest of this step's graph still needs them.
            self._rollback_pending = action == "rollback"
        else:
            halt_checkpoint = Path(trainer.default_root_dir) / "checkpoints" / f"halt-step{step:06d}.ckpt"
            trainer.save_checkpoint(halt_checkpoint, weights_only=False)
            raise DivergenceHalt(f"{message}. Stopped (divergence.{detector}.action=halt); bundle: {folder}; "
                                 f"replay it with: python -m trainer.replay {folder}")

    def _restore_buffers(self, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer | None) -> None:
        """Puts back the BatchNorm statistics that the bad batch moved: of the network whose update is
        dropped (its forward pass is over; another network's graph may still need its own), or of all."""
        owned = {self._names.get(p, "").split(".", 1)[0] for g in optimizer.param_groups for p in g["params"]} \
            if optimizer is not None else None
        pairs = [(b, saved) for (name, b), saved in zip(_float_buffers(pl_module), self._buffers)
                 if owned is None or name.split(".", 1)[0] in owned]
        if pairs:
            torch._foreach_copy_([b for b, _ in pairs], [saved for _, saved in pairs])

    def _rollback(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        if not last.is_file():
            rank_zero_warn("divergence rollback: no last.ckpt yet, dropping the update only")
            return
        checkpoint = load_checkpoint_file(last)
        pl_module.load_state_dict(checkpoint["state_dict"])
        self.rollbacks += 1
        for opt, state in zip(trainer.optimizers, checkpoint["optimizer_states"]):
            opt.load_state_dict(state)
            for group in opt.param_groups:
                group["lr"] *= self.lr_scale**self.rollbacks

    def _record(self, trainer: L.Trainer, detection: dict[str, Any]) -> None:
        folder = Path(trainer.default_root_dir) / "divergence"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"events-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(detection) + "\n")
        for logger in trainer.loggers:
            logger.log_metrics({f"divergence/{detection['detector']}": 1.0}, step=detection["step"])

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "bundles_written": self.bundles_written,
                "spikes": {k: d.state_dict() for k, d in self.spikes.items()}, "quiet_until": self._quiet_until}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollbacks, self.bundles_written = state["rollbacks"], state["bundles_written"]
        self._quiet_until = dict(state.get("quiet_until", {}))
        for key, detector_state in state["spikes"].items():
            self.spikes[key].load_state_dict(detector_state)


def step_signals(pl_module: L.LightningModule, outputs: Any) -> dict[str, torch.Tensor]:
    """The numbers a task reports for every step: `pl_module.step_signals` (set in training_step), else the
    loss that an automatically optimized training_step returned."""
    signals = getattr(pl_module, "step_signals", None)
    if signals:
        return dict(signals)
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return {"loss": loss} if isinstance(loss, torch.Tensor) else {}


def _float_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(name, b) for name, b in module.named_buffers() if b.is_floating_point()]


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
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            artifact = wandb.Artifact(f"divergence-{logger.experiment.id}-{folder.name}", type="divergence")
            artifact.add_dir(str(folder))
            logger.experiment.log_artifact(artifact)
