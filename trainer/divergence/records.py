"""What the guard keeps of a batch until its numbers are read (one batch later), and what an alarm found."""

from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch

from trainer.distributed.fsdp import clean_name
from trainer.divergence.detectors import Alarm
from trainer.divergence.gate import GateStep
from trainer.tasks.base import StepReport


@dataclass
class BatchRecord:
    """One training batch, as the guard keeps it until its numbers are read: what a report needs to write a
    bundle of it, and what to put back if its update is dropped."""

    step: int
    epoch: int
    batch_idx: int
    data: Any  # what the step trained on: the loader's batch, or the task's own (RL)
    rng: dict[str, Any]  # at the start of the batch
    buffers: list[torch.Tensor]  # float buffers (BatchNorm statistics) at the start of the batch
    lrs: list[list[float]]  # each optimizer's learning rates at the start of the batch
    parity: int  # of the batch's number in the run: its buffer slot and the gate's freeze flag
    limits: dict[str, tuple[float, float]]  # the spike and blow-up limits the gate held, by gradient series
    gate_steps: list[GateStep] = field(default_factory=list)
    report: StepReport | None = None  # its numbers are in the readout, after the gate steps'

    def values(self, trainer: L.Trainer, device: torch.device) -> torch.Tensor:
        """The batch's numbers in one device tensor, for the readout: each gate step's, then the report's
        (averaged over ranks: the same numbers on every rank, so the same decisions)."""
        values = [s.values for s in self.gate_steps]
        if self.report is not None:
            scalars = torch.stack([_scalar(v) for v in self.report.scalars().values()])
            if trainer.world_size > 1:
                scalars = trainer.strategy.reduce(scalars, reduce_op="mean")
            values.append(scalars)
        return torch.cat(values) if values else torch.empty(0, device=device)

    def readings(self, values: list[float]) -> tuple[list[tuple[GateStep, float, bool]], dict[str, float]]:
        """The batch's numbers as the readout gives them back: (gate step, gradient norm, whether its update
        was dropped) per optimizer step, and the report's numbers by name."""
        fields = len(GateStep.FIELDS)
        steps = [
            (gate_step, values[i * fields], bool(values[i * fields + 1]))
            for i, gate_step in enumerate(self.gate_steps)
        ]
        reported = values[len(self.gate_steps) * fields :]
        return steps, dict(zip(self.report.scalars(), reported)) if self.report is not None else {}


@dataclass
class Finding:
    """An alarm of one detector on one series, at the step it was raised, and where it came from."""

    detector: str
    series: str
    reason: str
    value: float
    step: int
    record: BatchRecord | None = None  # the batch it was read from (None: a sync's or a validation's)
    gate_step: GateStep | None = None  # on a gradient: the optimizer step, which the gate has acted on
    alarm: Alarm | None = None  # a spike's or a level's numbers


def float_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The module's floating-point buffers (BatchNorm statistics) by clean name: what a forward pass moves."""
    return [(clean_name(name), b) for name, b in module.named_buffers() if b.is_floating_point()]


def _scalar(value: torch.Tensor) -> torch.Tensor:
    """A reported number as a float32 0-d tensor, without an op when it is one (each op is a launch)."""
    return value if value.dtype == torch.float32 and value.dim() == 0 else value.float().reshape(())
