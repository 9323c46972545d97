"""Errors that are the user's to fix: reported as one line with the fix, never as a traceback."""


class UserError(Exception):
    """A problem in the user's config, data or files. The message names the problem and the fix."""


class DivergenceHalt(UserError):
    """Training stopped on purpose by the divergence guard; the message names the bundle to replay."""


class DivergedRun(DivergenceHalt):
    """Training ran to its end, and the divergence guard judged the run failed: a rule that judges a whole run
    (the monitored metric far below its best, a GAN's discriminator winning the last epoch or its samples'
    diversity collapsed) still held."""

    def __init__(self, verdict: str, run_dir: object):
        super().__init__(
            f"the run ended diverged: {verdict} (its checkpoints and divergence/ events: {run_dir})"
        )
        self.verdict = verdict


class Preempted(Exception):
    """Training stopped on SLURM's warning signal with last.ckpt saved. The CLI requeues the job (when
    `requeue` is set) only after the run has closed its W&B run and written its summary, because SLURM ends
    a job the moment it is requeued."""

    def __init__(self, requeue: bool):
        super().__init__("preempted")
        self.requeue = requeue
