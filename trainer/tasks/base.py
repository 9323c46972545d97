"""The contract between a task and the divergence guard (also read by `mode=lr_find` and the replay).

A task subclasses `Task` and ends its training step with `self.report(StepReport(losses=..., signals=...))`:
- `losses` are what the step minimises, positive: the guard watches each for NaN/Inf, spikes and a rising
  level, the LR finder follows their sum, the replay prints them;
- `signals` are other numbers of the step (a total, a KL, a clip fraction): logged and checked for NaN/Inf.
Subclasses of `StepReport` carry what only some tasks know, and name the guard's collapse checks that read
it (`collapse_checks`, trainer/divergence/collapse.py): `GANReport` (a GAN's discriminator outputs),
`PolicyReport` (a policy's entropy and how far an update moved it), `ValueReport` (Q-values and the largest
possible return).
A step that makes its own data (RL plays in its environments) names it with `self.train_on(data)` before it
updates: a divergence bundle keeps that data, and a replay hands it back to `training_step` as the batch.
Other steps train on the loader's batch, which the guard keeps itself. A validation may end with
`self.report_validation(...)`: a generative task's sample diversity, watched for mode collapse.

A plain LightningModule with automatic optimization works too: its returned loss is its one loss.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning_utilities.core.apply_func import apply_to_collection

from trainer.distributed.fsdp import clip_grad_norm_over_shards, is_sharded
from trainer.errors import UserError
from trainer.lightning_internals import is_logging_step

Tensors = dict[str, torch.Tensor]


@dataclass
class StepReport:
    losses: Tensors
    signals: Tensors = field(default_factory=dict)
    # The guard's collapse checks that apply to these numbers, by name (trainer/divergence/collapse.py).
    collapse_checks: ClassVar[tuple[str, ...]] = ()

    def detached(self) -> "StepReport":
        return replace(
            self,
            **{
                f.name: apply_to_collection(getattr(self, f.name), torch.Tensor, torch.Tensor.detach)
                for f in fields(self)
            },
        )

    def describe(self) -> dict[str, Any]:
        """What the report is, without its numbers: its type, the names of its losses, its constants."""
        constants = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), (int, float)) or getattr(self, f.name) is None
        }
        return {"type": type(self).__name__, "losses": list(self.losses), "constants": constants}

    def scalars(self) -> Tensors:
        """Every number of the report by name: the losses, the signals, and the fields of subclasses."""
        named = {f.name: getattr(self, f.name) for f in fields(self)}
        return {
            **self.losses,
            **self.signals,
            **{k: v for k, v in named.items() if isinstance(v, torch.Tensor)},
        }


@dataclass
class GANReport(StepReport):
    """A GAN's step: also the discriminator's mean probability of "real" on real images, D(x), and on
    generated ones, D(G(z)), as the DCGAN paper names them."""

    collapse_checks: ClassVar[tuple[str, ...]] = ("discriminator_wins",)
    D_x: torch.Tensor | None = None
    D_G_z: torch.Tensor | None = None


@dataclass
class PolicyReport(StepReport):
    """A policy-gradient step: also the policy's mean entropy, the largest entropy a policy over these
    actions can have (log of their number; None for continuous actions, whose entropy has no maximum), and
    the mean approximate KL divergence of the updated policy from the one that collected the data."""

    collapse_checks: ClassVar[tuple[str, ...]] = ("policy_entropy", "policy_kl")
    entropy: torch.Tensor | None = None
    max_entropy: float | None = None
    approx_kl: torch.Tensor | None = None


@dataclass
class ValueReport(StepReport):
    """A value-learning step (DQN): also the mean Q-value of the batch, and the largest return the rewards
    seen so far allow, max |r| / (1 - gamma) (None for gamma = 1). No correct Q-value exceeds it."""

    collapse_checks: ClassVar[tuple[str, ...]] = ("q_values",)
    q_values: torch.Tensor | None = None
    max_return: float | None = None


@dataclass
class ValidationReport:
    """What a validation tells the guard. A generative task reports the diversity of its samples relative to
    the data's (1: as diverse as the data), whose fall is mode collapse."""

    sample_diversity: float | None = None


class Task(L.LightningModule):
    # The metrics this task's validation logs, each with the direction that is better (`{"val/mse": "min"}`;
    # "max", or None for none): the config check refuses a `monitor.metric` outside them before anything runs,
    # and metrics.json keeps each one's best by it. Written as a literal, the check reads it from the source
    # without importing the task. Empty: not declared; a misspelt metric is found only at the first
    # validation, and directions come from the usual words of metric names.
    validation_metrics: ClassVar[Mapping[str, str | None]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.step_report: StepReport | None = None
        self.step_data: Any = None  # what this step trains on when it is not the loader's batch
        self.validation_report: ValidationReport | None = None

    @property
    def hparams(self) -> AttributeDict:
        """Lightning's, as `save_hyperparameters` of a task's arguments makes them (`self.hparams.lr`)."""
        hparams = super().hparams
        assert isinstance(hparams, AttributeDict)
        return hparams

    def optimizer(self) -> LightningOptimizer:
        """The optimizer of a task that has one, in a manual step (`optimizers()` is one or a list)."""
        optimizer = self.optimizers()
        if isinstance(optimizer, list):
            raise TypeError(f"{type(self).__name__} has {len(optimizer)} optimizers, not one")
        return optimizer

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.step_report = self.step_data = None  # a step that reports nothing must not show the last one's

    def on_train_start(self) -> None:
        # A resumed schedule keeps the length it was planned for (OneCycleLR's total_steps): a run resumed
        # with a larger max_epochs or max_steps would crash when the schedule ends.
        wanted = self.trainer.estimated_stepping_batches
        for config in self.trainer.lr_scheduler_configs:
            planned = getattr(config.scheduler, "total_steps", None)
            if isinstance(planned, int) and wanted > planned:
                raise UserError(
                    f"the checkpoint's learning-rate schedule ({type(config.scheduler).__name__}) ends at "
                    f"step {planned} and this run asks for {int(wanted)}: resume with the first run's "
                    "trainer.max_epochs and trainer.max_steps, or start a new run (resume=never)"
                )

    def planned_steps(self) -> int:
        """The optimizer steps this run takes, for a schedule sized by them (OneCycleLR's total_steps)."""
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise UserError(
                f"{type(self).__name__}'s learning-rate schedule is sized by the run's length, and this run "
                "has no end: set trainer.max_steps or trainer.max_epochs"
            )
        return max(1, int(steps))

    def train_on(self, data: Any) -> None:
        self.step_data = data

    def report(self, report: StepReport) -> None:
        """The step's numbers for the guard; on logging steps also to the loggers as train/<name>."""
        self.step_report = report.detached()
        if is_logging_step(self.trainer):
            self.log_report(self.step_report)

    def log_report(self, report: StepReport) -> None:
        self.log_dict({f"train/{k}": v for k, v in report.scalars().items()})

    def report_validation(self, report: ValidationReport) -> None:
        self.validation_report = report

    def progress(self) -> tuple[int, int, str] | None:
        """(done, total, unit) when a run is not measured in epochs of batches (RL: env steps); the
        progress bar shows it instead."""
        return None

    def clip_gradients(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if not gradient_clip_val:
            return
        by_norm = gradient_clip_algorithm in (None, "norm")
        plugin = self.trainer.precision_plugin
        if by_norm and is_sharded(self.trainer.strategy):
            # Lightning's FSDP precision refuses norm clipping: the norm of sharded gradients spans the ranks.
            clip_grad_norm_over_shards(self.trainer, optimizer, gradient_clip_val)
        elif getattr(plugin, "scaler", None) is None:
            # No loss scaler (bf16-mixed, 32-bit): the gradients are true ones, so a fused optimizer (which
            # Lightning's mixed-precision plugin refuses to clip) is clipped like any other, on the device.
            clip = plugin.clip_grad_by_norm if by_norm else plugin.clip_grad_by_value
            clip(optimizer, gradient_clip_val)
        else:
            super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @property
    def fused_optimizer(self) -> bool:
        """Whether Adam/AdamW run as one fused kernel over all parameters here (CPU and CUDA): a third of the
        default's time per update for small RL networks, 13% of a CPU step for MiniLM (scripts/bench_qa.py).
        Not under fp16's loss scaler, which cannot unscale a fused optimizer's gradients for clipping."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer else None
        return self.device.type in ("cpu", "cuda") and scaler is None


def stepwise(
    optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler
) -> dict[str, Any]:
    """`configure_optimizers`' answer for a learning-rate schedule stepped after every optimizer step."""
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def step_report(module: L.LightningModule, outputs: Any) -> StepReport | None:
    """What the step that just ran reports: a Task's report, else the loss a training_step returned."""
    if isinstance(module, Task):
        return module.step_report
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return StepReport({"loss": loss.detach()}) if isinstance(loss, torch.Tensor) else None


def step_data(module: L.LightningModule, batch: Any) -> Any:
    """The data the step trained on: a Task's own (RL), else the loader's batch."""
    own = module.step_data if isinstance(module, Task) else None
    return batch if own is None else own
