"""Any kill resumes exactly: a run killed with SIGKILL (the whole job at once, as when a node is lost) at
moments drawn from a seeded generator, and started again with the same command each time, ends with the
weights of a run that was never interrupted, and every attempt writes into one W&B run.

The moments are ones that show from outside the job: a checkpoint write under way (its temporary file),
the end of a validation (metrics.json rewritten, before last.ckpt is saved past it), a divergence bundle
being written (its folder appears; a NaN batch is injected and its update skipped, so the run goes on), and
training steps (a drawn delay after the attempt's first checkpoint). Where in the code each kill lands
depends on the machine's speed; which moments are drawn does not. Set TRAINER_KILL_SEED to draw others.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import REPO, TINY_DCGAN, cli_env, differences, last_checkpoint, run_cli
from wandb_offline import find_runs, read_run

SEED = int(os.environ.get("TRAINER_KILL_SEED", "20261204"))
ARGS = [
    *TINY_DCGAN,
    "++trainer.max_epochs=4",  # room for every drawn kill after the ones before it
    "++trainer.val_check_interval=0.5",  # validations within epochs, and checkpoints on both sides of them
    "callbacks.last_checkpoint.every_n_train_steps=4",  # last.ckpt after every 2 batches
    "divergence.nonfinite.action=skip",  # the injected NaN batch: an event with its bundle; the run goes on
]
POLL_S = 0.002  # checkpoint writes of this model take 5-60 ms here


@dataclass
class Moment:
    """The `nth` time in an attempt that `what` shows in the run dir; for training, `delay` seconds after the
    attempt's first checkpoint."""

    what: str  # bundle | checkpoint | validation | training
    nth: int = 1
    delay: float = 0.0

    def __str__(self) -> str:
        return {
            "bundle": "a bundle write (its folder appears)",
            "checkpoint": f"last.ckpt write #{self.nth} (its temporary file appears)",
            "validation": f"validation end #{self.nth} (metrics.json rewritten)",
            "training": f"training, {self.delay} s after the first checkpoint",
        }[self.what]


def draw_kills(rng: random.Random) -> tuple[int, list[Moment]]:
    """The batch to poison, and the moments to kill at: its bundle first (the run must not be past that batch
    yet), then the others in a drawn order."""
    poisoned_batch = rng.randint(1, 5)
    others = [
        Moment("checkpoint", nth=rng.randint(1, 2)),
        Moment("validation", nth=rng.randint(1, 2)),
        Moment("training", delay=round(rng.uniform(0.05, 0.5), 2)),
    ]
    rng.shuffle(others)
    return poisoned_batch, [Moment("bundle"), *others]


@dataclass
class RunDirWatch:
    """Counts, from outside the job, what starts in its run dir: checkpoint writes (last.ckpt's temporary
    file appears), finished checkpoints, metrics.json updates (validation ends), bundle folders."""

    run_dir: Path
    seen: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("checkpoint", "saved", "validation", "bundle"), 0)
    )
    first_saved_at: float | None = None

    def __post_init__(self) -> None:
        self._last = self._look()

    def _look(self) -> dict[str, object]:
        checkpoints = self.run_dir / "checkpoints"
        return {
            "checkpoint": any(p.name.startswith(".last.ckpt.tmp") for p in _entries(checkpoints)),
            "saved": _version(checkpoints / "last.ckpt"),
            "validation": _version(self.run_dir / "metrics.json"),
            "bundle": {p.name for p in _entries(self.run_dir / "divergence") if p.name.startswith("step")},
        }

    def update(self) -> None:
        now = self._look()
        for what, state in now.items():
            if state and state != self._last[what]:  # appeared, or changed
                self.seen[what] += 1
        if self.seen["saved"] and self.first_saved_at is None:
            self.first_saved_at = time.monotonic()
        self._last = now

    def reached(self, moment: Moment) -> bool:
        if moment.what == "training":
            return self.first_saved_at is not None and time.monotonic() - self.first_saved_at >= moment.delay
        return self.seen[moment.what] >= moment.nth


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        return list(os.scandir(folder))
    except FileNotFoundError:
        return []


def _version(path: Path) -> tuple[int, int] | None:
    """Tells two writes apart (each is a new file renamed over the last; file times may be coarse)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def start(*args: str, run_dir: Path, home: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=cli_env(home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the job, its data workers, W&B's service
    )


def kill_at(moment: Moment, *args: str, run_dir: Path, home: Path) -> str:
    """Runs the command until `moment`, kills the whole job; returns what it left, for the test's log."""
    job, watch = start(*args, run_dir=run_dir, home=home), RunDirWatch(run_dir)
    try:
        while not watch.reached(moment):
            assert job.poll() is None, f"the run ended before {moment} (TRAINER_KILL_SEED={SEED})"
            time.sleep(POLL_S)
            watch.update()
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    unfinished = sorted(p.name for p in run_dir.rglob(f".*.tmp{job.pid}"))
    saved = (run_dir / "checkpoints" / "last.ckpt").is_file()
    return f"last.ckpt {last_checkpoint(run_dir)['global_step'] if saved else None}, left {unfinished}"


@pytest.mark.slow
def test_a_run_killed_at_random_moments_ends_as_an_uninterrupted_one_in_one_wandb_run(
    tmp_path: Path, home: Path
) -> None:
    poisoned_batch, kills = draw_kills(random.Random(SEED))
    args = [*ARGS, f"divergence.inject.step={poisoned_batch}"]
    print(f"TRAINER_KILL_SEED={SEED}: NaN batch {poisoned_batch}; kills at {'; '.join(map(str, kills))}")
    run_dir = tmp_path / "killed"
    straight = start(*args, run_dir=tmp_path / "straight", home=home)  # alongside, on the other core
    try:
        for moment in kills:
            print(f"killed at {moment}: {kill_at(moment, *args, run_dir=run_dir, home=home)}")
        resumed_from = last_checkpoint(run_dir)["global_step"] // 2  # batches (two optimizer steps each)
        last = run_cli(*args, f"hydra.run.dir={run_dir}", home=home)
        assert straight.wait(timeout=300) == 0
    finally:
        if straight.poll() is None:
            os.killpg(straight.pid, signal.SIGKILL)
    assert last.returncode == 0 and "resuming from" in last.stderr, last.stderr[-3000:]

    uninterrupted, resumed = last_checkpoint(tmp_path / "straight"), last_checkpoint(run_dir)
    assert resumed["global_step"] == 32  # 4 epochs x 4 batches x 2 optimizers
    found = list(differences(training_state(uninterrupted), training_state(resumed), "checkpoint"))
    assert not found, f"{found[:10]} (TRAINER_KILL_SEED={SEED})"
    assert (run_dir / "divergence" / f"step{poisoned_batch:06d}-nonfinite" / "bundle.pt").is_file()
    unfinished = [*run_dir.glob("checkpoints/.*.tmp[0-9]*"), *run_dir.glob("divergence/*/.*.tmp[0-9]*")]
    assert not unfinished  # what the kills left, removed as the next attempt started

    pointer = json.loads((run_dir / "wandb_run.json").read_text())
    attempts = [read_run(folder, strict=False) for folder in find_runs(run_dir / "wandb")]
    assert len(attempts) == len(kills) + 1 and {a.run_id for a in attempts} == {pointer["id"]}
    assert attempts[-1].exit_code == 0 and not any(a.finished for a in attempts[:-1])
    # W&B writes an offline run's log in 32 KiB blocks: a killed attempt keeps only what filled one (here
    # nothing). The last attempt continues the run where the last checkpoint stood, up to the end.
    logged = [step for _, step in attempts[-1].series("trainer/global_step")]
    assert attempts[-1].resumed and resumed_from <= logged[0] and logged[-1] == 16


def training_state(checkpoint: dict) -> dict:
    """What decides the rest of training: weights, optimizer states, the step, the RNG states."""
    keys = ("global_step", "epoch", "state_dict", "optimizer_states")
    return {**{key: checkpoint[key] for key in keys}, "rng": checkpoint["callbacks"]["RNGState"]}
