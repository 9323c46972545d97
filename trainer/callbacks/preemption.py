"""Preemption and time limits on SLURM: save, requeue, stop, and let the requeued job resume.

SLURM warns a job with a signal some time before its time limit or a preemption (our templates ask for
SIGUSR1 `slurm.signal_seconds` ahead). On it, training finishes the current batch, writes last.ckpt on every
rank's behalf, runs `scontrol requeue` once, and stops. The requeued job runs the same command in the same
run dir, so it resumes from that checkpoint into the same W&B run. Under DDP the ranks agree on the stop
before anyone saves. Lightning's own SLURM requeue is switched off where this runs (trainer/run.py), so the
two never handle the same signal.
"""

import logging
import os
import signal
import subprocess
import threading
from typing import Any

import lightning as L
import torch

from trainer.callbacks.last_checkpoint import LastCheckpoint

log = logging.getLogger(__name__)


class Preemption(L.Callback):
    def __init__(self, signal_name: str = "SIGUSR1", requeue: bool = True):
        self.signum = signal.Signals[signal_name]
        self.requeue = requeue
        self.requested = False
        self.stopped = False  # this callback ended the run (the run summary says "preempted")
        self.listening = False  # outside SLURM no signal is awaited, and batches cost nothing

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if "SLURM_JOB_ID" in os.environ and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._on_signal)
            self.listening = True

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True  # acted on at the end of the batch, where the state is whole

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not self.listening:
            return
        requested = self.requested
        if trainer.world_size > 1:  # one rank may see the signal a batch later than another
            flag = torch.tensor(float(requested), device=trainer.strategy.root_device)
            requested = bool(trainer.strategy.reduce(flag, reduce_op="max").item())
        if not requested:
            return
        for callback in trainer.callbacks:
            if isinstance(callback, LastCheckpoint):
                callback.save(trainer)
        job = os.environ.get("SLURM_JOB_ID")
        if self.requeue and job and trainer.is_global_zero:
            log.info(f"{self.signum.name} received, last.ckpt saved, requeueing SLURM job {job}")
            subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)
        trainer.should_stop = self.stopped = True
