"""No host reads in a training step outside logging steps: the guard, the monitor and every other part of
trainer decide on the device and read late (trainer/perf/profiling.py counts the reads, by line)."""

from collections import Counter
from pathlib import Path

import pytest
from helpers import TINY_DCGAN, compose_config

from trainer.perf.profiling import HostReads, StepReads
from trainer.run import train
from trainer.tasks.base import Task

QUIET = ["logger=none", "++trainer.enable_progress_bar=false", "++trainer.log_every_n_steps=5"]
EXPS = {
    "dcgan": [*TINY_DCGAN, "++trainer.limit_train_batches=12", "++trainer.max_epochs=1"],
    "detector": [
        "+exp=detector",
        "data.canvases.train_images=48",
        "data.canvases.val_images=4",
        "data.batch_size=4",
        "++trainer.max_epochs=1",
    ],
    "qa": [
        "+exp=qa",
        "data.max_length=64",
        "data.doc_stride=16",
        "data.batch_size=4",
        "data.facts.train_paragraphs=8",
        "++trainer.limit_train_batches=12",
        "++trainer.limit_val_batches=1",
    ],
    "ppo": ["+exp=ppo", "task.total_env_steps=6144", "task.eval_episodes=1"],
    "dqn": ["+exp=dqn", "task.total_env_steps=6000", "task.learning_starts=500", "task.eval_episodes=1"],
}
# Where a task's own step must read on the host: RL plays in environments that run on the CPU (actions out,
# observations in) and samples its replay buffer there.
HOST_SIDE = {
    "ppo": ("trainer/tasks/rl/base.py", "trainer/tasks/rl/envs.py", "trainer/models/rl.py"),
    "dqn": (
        "trainer/tasks/rl/base.py",
        "trainer/tasks/rl/envs.py",
        "trainer/models/rl.py",
        "trainer/tasks/rl/dqn.py",
    ),
}
# A library's read inside a call of trainer's: transformers checks whether a padding mask is all ones (to
# drop it for flash attention) on every forward pass of its encoders; a plain loop pays it as well.
LIBRARY_READS = ("transformers/masking_utils.py",)


def count_reads(overrides: list[str], run_dir: Path) -> StepReads:
    with HostReads() as reads:
        steps = StepReads(reads)

        def first(pl_trainer):
            pl_trainer.callbacks.insert(0, steps)
            return pl_trainer

        train(compose_config(*overrides, *QUIET, run_dir=run_dir), prepare=first)
    return steps


def unexplained(exp: str, reads: Counter[str]) -> dict[str, int]:
    """Reads that neither the exp's host-side work nor a known library read explain."""
    allowed = HOST_SIDE.get(exp, ())
    return {
        line: n
        for line, n in reads.items()
        if not line.startswith(allowed) and not line.partition(" via ")[2].startswith(LIBRARY_READS)
    }


@pytest.mark.parametrize(
    "exp", [pytest.param(exp, marks=[pytest.mark.slow] if exp != "dcgan" else []) for exp in EXPS]
)
def test_no_host_reads_in_a_training_step_outside_logging_steps(exp: str, tmp_path: Path) -> None:
    steps = count_reads(EXPS[exp], tmp_path)
    quiet_batches = [reads for logging, reads in steps.batches if not logging]
    assert len(quiet_batches) >= 4 and any(logging for logging, _ in steps.batches)
    assert unexplained(exp, steps.outside_logging_steps()) == {}


def test_the_count_sees_a_read_in_the_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An optimizer that is not fused cannot be told to skip on the device: the gate reads its decision on
    the host at every step, and the count must show it."""
    monkeypatch.setattr(Task, "fused_optimizer", property(lambda self: False))
    steps = count_reads(EXPS["dcgan"], tmp_path)
    outside = steps.outside_logging_steps()
    assert any(line.startswith("trainer/divergence/gate.py") for line in outside), outside
