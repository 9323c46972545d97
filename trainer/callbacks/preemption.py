"""Preemption and time limits on SLURM: save, stop, requeue, and let the requeued job resume.

SLURM warns a job with a signal some time before its time limit or a preemption (our templates ask for SIGUSR1
`slurm.signal_seconds` ahead). On it, training finishes the current batch, writes last.ckpt on every rank's
behalf and stops (under DDP a batch later: the ranks' vote is read from the device late, so that no training
step waits for it); once the run has closed (W&B run finished, summary written), the CLI runs `scontrol
requeue` once (requeueing ends the job at once, so it comes last). The requeued job runs the same command in
the same run dir, so it resumes from that checkpoint into the same W&B run. Under DDP the ranks agree on the
stop before anyone saves. Lightning's own SLURM requeue is switched off where this runs (trainer/run.py), so
the two never handle the same signal.
"""

import logging
import os
import signal
import subprocess
import threading
import time
from typing import Any

import lightning as L
import torch

from trainer.callbacks.last_checkpoint import LastCheckpoint
from trainer.perf.readout import DelayedReadout

log = logging.getLogger(__name__)
REQUEUE_WAIT_S = 120


class Preemption(L.Callback):
    def __init__(self, signal_name: str = "SIGUSR1", requeue: bool = True):
        self.signum = signal.Signals[signal_name]
        self.requeue = requeue
        self.requested = False
        self.stopped = False  # this callback ended the run (the run summary says "preempted")
        self.listening = False  # outside SLURM no signal is awaited, and batches cost nothing
        self._votes: DelayedReadout[None] = DelayedReadout()

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
            flag = torch.full((1,), float(requested), device=trainer.strategy.root_device)
            votes = self._votes.put(trainer.strategy.reduce(flag, reduce_op="max"), None)
            requested = any(vote for _, (vote,) in votes)
        if not requested:
            return
        for callback in trainer.callbacks:  # pyright: ignore[reportAttributeAccessIssue]  # set by Lightning
            if isinstance(callback, LastCheckpoint):
                callback.save(trainer)
        then = "the job is requeued when the run has closed" if self.requeue else "stopping"
        log.info(f"{self.signum.name} received, last.ckpt saved; {then}")
        trainer.should_stop = self.stopped = True


def requeue_slurm_job() -> None:
    """Requeue this SLURM job (once, from rank zero): the requeued job runs the same command, which resumes
    from last.ckpt. SLURM ends this job as soon as it is requeued."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or int(os.environ.get("SLURM_PROCID", "0")) != 0:
        return
    log.info(f"requeueing SLURM job {job}")
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        log.warning(
            f"scontrol requeue {job} failed ({done.stderr.strip()}): resubmit the same command to resume"
        )
        return
    # Wait for SLURM to end the job: exiting first could let the job complete before the requeue lands.
    time.sleep(REQUEUE_WAIT_S)
