"""What the tests share, and scripts/bench_*.py too: compose configs in-process, run the real CLI (`python -m
trainer`) in a subprocess, read what a run left (checkpoints, divergence events), and the small runs several
test files use. Fixtures and pytest hooks are in conftest.py."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from trainer.cli.preflight import config_dir

REPO = Path(__file__).resolve().parent.parent

# A DCGAN small enough that an end-to-end run takes seconds on 2 CPU cores.
TINY_DCGAN = [
    "+exp=dcgan",
    "model.generator.width=8",
    "model.discriminator.width=8",
    "data.image_size=16",
    "data.batch_size=16",
    "task.generator_steps=1",  # two optimizer steps per batch: the step counts the tests reason with
    "++trainer.limit_train_batches=4",
    "++trainer.limit_val_batches=1",
    "++trainer.log_every_n_steps=2",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
]
# The DCGAN paper's recipe in place of the exp's (conf/exp/dcgan.yaml): for the tests whose drills were
# calibrated on it (a learning rate that collapses it, a spike the guard must see) or that need a tiny run
# whose FID still improves after its first epoch.
PAPER_DCGAN = [
    "task.loss=bce",
    "model.discriminator.norm=batch",
    "task.lr=2e-4",
    "task.lr_d=null",
    "task.beta1=0.5",
    "task.beta2=0.999",
    "task.ema_decay=0",
]
# Extractive QA with the real MiniLM encoder on a few short windows: one epoch of 2 steps.
TINY_QA = [
    "+exp=qa",
    "data.max_length=64",
    "data.doc_stride=16",
    "data.batch_size=4",
    "data.facts.train_paragraphs=8",
    "++trainer.limit_train_batches=2",
    "++trainer.limit_val_batches=1",
    "++trainer.max_epochs=1",
]
# Runs with nothing to look at: no loggers, no progress bar, no model summary.
QUIET = ["logger=none", "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false"]
# PPO on CartPole for a few thousand env steps: seconds on 2 cores.
SHORT_PPO = [
    "+exp=ppo",
    "task.total_env_steps=2048",
    "task.env_steps_per_epoch=1024",
    "task.eval_episodes=3",
    *QUIET,
]
# A task written outside the package (tests/own_task), found through Hydra's search path.
OWN = REPO / "tests" / "own_task"
OWN_EXP = [
    f"hydra.searchpath=[file://{OWN / 'conf'}]",
    "+exp=digit_classifier",
    "++trainer.enable_progress_bar=false",
]


def compose_config(*overrides: str, run_dir: Path | None = None) -> DictConfig:
    extra = [f"run_dir={run_dir}"] if run_dir is not None else []
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("config", overrides=[*overrides, *extra])


def cli_env(home: Path) -> dict[str, str]:
    """No W&B credentials (so `mode=auto` means offline), an empty home, the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), WANDB_SILENT="true", PYTHONPATH=str(REPO))
    return env


# The console script pip installs (`trainer`), beside the interpreter: unlike `python -m trainer`, it does not
# itself put the working directory on the import path.
CONSOLE_SCRIPT = Path(sys.executable).parent / "trainer"


def run_cli(
    *args: str,
    home: Path,
    cwd: Path | None = None,
    timeout: float = 240,
    env: dict[str, str] | None = None,
    script: bool = False,
) -> subprocess.CompletedProcess:
    """`python -m trainer ARGS`, or with `script` the `trainer` console script."""
    command = [str(CONSOLE_SCRIPT)] if script else [sys.executable, "-m", "trainer"]
    return subprocess.run(
        [*command, *args],
        cwd=cwd or REPO,
        env={**cli_env(home), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kill_at_first_checkpoint(*args: str, run_dir: Path, home: Path) -> None:
    """Starts `python -m trainer` and kills the whole job (every rank at once, as when a node is lost) as
    soon as its first last.ckpt is written."""
    job = subprocess.Popen(
        [sys.executable, "-m", "trainer", *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=cli_env(home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group
    )
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "last.ckpt").is_file():
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def run_replay(bundle: Path, home: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m trainer.replay <bundle>` as a user runs it; it must succeed and reproduce the event."""
    replayed = subprocess.run(
        [sys.executable, "-m", "trainer.replay", str(bundle)],
        env=cli_env(home),
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    assert "reproduced" in replayed.stdout and "did not reproduce" not in replayed.stdout
    return replayed


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed as bad input must: non-zero exit, no traceback, one `error:` line that holds
    `fragments`."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def last_step(run_dir: Path) -> int:
    """The global step of a run's last checkpoint."""
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


def divergence_settings(exp: str) -> dict:
    """The `divergence` settings an exp runs with, as plain data."""
    return OmegaConf.to_container(compose_config(f"+exp={exp}").divergence, resolve=True)


def divergence_events(run_dir: Path, rank: int = 0) -> list[dict]:
    """The guard's events file of a run (none written: no events)."""
    path = run_dir / "divergence" / f"events-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_own(*args: str, home: Path) -> subprocess.CompletedProcess:
    """The README's command: the `trainer` console script, in the folder that holds classifier.py."""
    return run_cli(*OWN_EXP, *args, home=home, cwd=OWN, script=True)


def last_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        assert opt_a["state"], "no optimizer state to compare"
        for param, state in opt_a["state"].items():
            assert torch.equal(state["exp_avg_sq"], opt_b["state"][param]["exp_avg_sq"])


def differences(a: Any, b: Any, where: str) -> Iterator[str]:
    """Where two checkpoint trees differ (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)):
            yield where
    elif isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            yield f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))}"
        for key in a.keys() & b.keys():
            yield from differences(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from differences(x, y, f"{where}[{i}]")
    elif a != b:
        yield f"{where}: {a!r} != {b!r}"
