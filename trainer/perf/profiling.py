"""What a training step costs the host: reads of tensor values (each a wait for the GPU), compiled graphs.

A read of a device tensor's value (`.item()`, `.tolist()`, `float(t)`, `if t:`, `.cpu()`) makes the host wait
until the GPU has done everything queued before it; one per step keeps a fast GPU idle while Python prepares
the next step. `HostReads` counts such reads by the line of trainer's own code that made them (directly, or
through a library it called), so a test can require none in a training step outside logging steps, and
`scripts/gpu_check.py` can show them. On a CPU machine every tensor is a host tensor: the count is of the
reads that would wait on a GPU. Host buffers that receive asynchronous copies (`host_buffer`) are not device
tensors, and reading them is not counted.

`compiled_graphs()` counts the graphs torch.compile has made so far in this process: a count that still grows
after warm-up means recompilation.
"""

import collections
import sys
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch

from trainer.lightning_internals import is_logging_step

PACKAGE = str(Path(__file__).resolve().parent.parent)
READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__array__")
LIGHTNING_LOOP = ("lightning/pytorch/loops/", "lightning/pytorch/trainer/")  # its own reads, not ours
DATA_LOADING = "torch/utils/data/"  # a loader works on host tensors


def host_buffer(like: torch.Tensor) -> torch.Tensor:
    """A host tensor shaped like `like` that a device copies into with `non_blocking=True`: pinned memory when
    a GPU is present, so the copy does not make the host wait."""
    buffer = torch.empty(like.shape, dtype=like.dtype, pin_memory=torch.cuda.is_available())
    # (an attribute of this tensor alone, read by HostReads: not a device tensor)
    buffer.is_host_buffer = True  # pyright: ignore[reportAttributeAccessIssue]
    return buffer


def compiled_graphs() -> int:
    """Graphs compiled by torch.compile (dynamo) in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class HostReads:
    """Counts host reads of tensor values made by trainer's code, by `file:line`, within its `with` block.

    with HostReads() as reads:
        ...
    reads.by_line  # Counter({'trainer/divergence/guard.py:182': 12, ...})
    """

    def __init__(self) -> None:
        self.by_line: collections.Counter[str] = collections.Counter()
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> "HostReads":
        for name in READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._counting(original))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

    def _counting(self, original: Any) -> Any:
        reads = self

        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not getattr(tensor, "is_host_buffer", False) and tensor.numel():
                where = _trainer_frame(sys._getframe(1))
                if where is not None:
                    reads.by_line[where] += 1
            return original(tensor, *args, **kwargs)

        return read

    def total(self) -> int:
        return sum(self.by_line.values())


def _trainer_frame(frame: FrameType | None) -> str | None:
    """Where trainer's code made a read: its innermost frame on the stack, as `trainer/x.py:line`, followed by
    ` via <library file:line>` when a library it called made the read. None for reads that are not trainer's:
    Lightning's own (its loop comes first on the stack) and data loading's (a loader's host tensors)."""
    if frame is None:
        return None
    root = str(Path(PACKAGE).parent)
    reader = frame
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(PACKAGE) and not filename.endswith("profiling.py"):
            if _loading_data(frame):
                return None
            where = f"{Path(filename).relative_to(root)}:{frame.f_lineno}"
            return where if frame is reader else f"{where} via {_short(reader)}"
        if any(part in filename for part in LIGHTNING_LOOP):
            return None
        frame = frame.f_back
    return None


def _loading_data(frame: FrameType | None) -> bool:
    while frame is not None:
        if DATA_LOADING in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def _short(frame: FrameType) -> str:
    """A library frame as `package/module.py:line` (the path below site-packages)."""
    path = frame.f_code.co_filename
    return f"{path.rpartition('site-packages/')[2]}:{frame.f_lineno}"


class DeviceSyncs:
    """On a GPU: every operation that made the host wait for it, counted by CUDA's sync debug mode, by the
    Python line that called it (`file:line`), whoever's code that is (Lightning's and libraries' too): what
    `HostReads` counts, and the waits it cannot see (a boolean mask's indexing, `nonzero`). Counts nothing
    without CUDA. Other warnings raised meanwhile are shown when the block ends."""

    MESSAGE = "called a synchronizing CUDA operation"

    def __init__(self) -> None:
        self.by_line: collections.Counter[str] = collections.Counter()
        self._caught: Any = None
        self._warnings: list[warnings.WarningMessage] = []

    def __enter__(self) -> "DeviceSyncs":
        if torch.cuda.is_available():
            self._caught = warnings.catch_warnings(record=True)
            self._warnings = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._caught is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self.collect()
        self._caught.__exit__(*exc)
        self._caught = None

    def collect(self) -> None:
        """Counts the waits warned about so far (StepReads calls it at batch boundaries)."""
        for caught in self._warnings:
            if self.MESSAGE in str(caught.message):
                self.by_line[f"{caught.filename.rpartition('site-packages/')[2]}:{caught.lineno}"] += 1
            else:
                warnings.showwarning(caught.message, caught.category, caught.filename, caught.lineno)
        self._warnings.clear()


class StepReads(L.Callback):
    """The host reads trainer's code makes in each training batch, and whether Lightning logs at that batch.
    A batch's reads are those from its start to the start of the next batch (or of validation, or the end of
    the epoch): its own callbacks' work at its end included. Put it first among the callbacks."""

    def __init__(self, reads: HostReads | DeviceSyncs) -> None:
        self.reads = reads
        self.batches: list[tuple[bool, collections.Counter[str]]] = []  # (logging step, reads by line)
        self._open: tuple[bool, collections.Counter[str]] | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._close(trainer)
        self._open = (is_logging_step(trainer), collections.Counter(self.reads.by_line))

    def on_validation_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._close(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._close(trainer)

    def _close(self, trainer: L.Trainer) -> None:
        if isinstance(self.reads, DeviceSyncs):
            self.reads.collect()
        if self._open is not None:
            # A batch that stops the run is a logging step too: Lightning logs when `should_stop` is set,
            # which a task may do at the very end of the batch.
            logging, before = self._open
            self.batches.append((logging or trainer.should_stop, self.reads.by_line - before))
            self._open = None

    def outside_logging_steps(self) -> collections.Counter[str]:
        """Reads made in batches that were not logging steps, by line."""
        total: collections.Counter[str] = collections.Counter()
        for logging, reads in self.batches:
            if not logging:
                total += reads
        return total
