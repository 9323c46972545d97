"""Values from the device, read one batch late so that the host never waits for the device.

`put` starts copying a batch's values into host memory (pinned: the copy runs beside the device's work)
and returns at once; the next batch's `put` returns the previous batch's values as Python floats. By then
the device has finished that copy, unless it runs more than a batch behind. `drain` waits for what is
still in flight (where the host waits anyway: validation, the end of an epoch, a checkpoint).
"""

from collections import defaultdict, deque
from typing import Any, Generic, TypeVar

import torch

from trainer.perf.profiling import host_buffer

Meta = TypeVar("Meta")


class DelayedReadout(Generic[Meta]):
    def __init__(self) -> None:
        self._in_flight: deque[tuple[torch.Tensor, Any, Meta]] = deque()  # (host buffer, copy done, meta)
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = defaultdict(list)

    def put(self, values: torch.Tensor, meta: Meta) -> list[tuple[Meta, list[float]]]:
        """Starts the copy of `values` (1-d, on the device); returns what was put before it, read."""
        buffer = self._buffer(values)
        buffer.copy_(values, non_blocking=True)
        done = None
        if values.is_cuda:
            done = torch.cuda.Event()
            done.record()
        self._in_flight.append((buffer, done, meta))
        return self._read(keep=1)

    def drain(self) -> list[tuple[Meta, list[float]]]:
        """Everything in flight, read (waits for the device)."""
        return self._read(keep=0)

    def discard(self) -> None:
        """Forgets what is in flight (after a rollback: values of a trajectory that is gone)."""
        for buffer, done, _ in self._in_flight:
            if done is not None:
                done.synchronize()  # the buffer is reused: its copy must be over
            self._free[_key(buffer)].append(buffer)
        self._in_flight.clear()

    def __len__(self) -> int:
        return len(self._in_flight)

    def _read(self, keep: int) -> list[tuple[Meta, list[float]]]:
        read = []
        while len(self._in_flight) > keep:
            buffer, done, meta = self._in_flight.popleft()
            if done is not None:
                done.synchronize()
            read.append((meta, buffer.tolist()))
            self._free[_key(buffer)].append(buffer)
        return read

    def _buffer(self, values: torch.Tensor) -> torch.Tensor:
        free = self._free[_key(values)]
        return free.pop() if free else host_buffer(values)


def _key(tensor: torch.Tensor) -> tuple[int, torch.dtype]:
    return tensor.numel(), tensor.dtype
