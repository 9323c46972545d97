"""Shared helpers: compose configs in-process, and run the real CLI (`python -m trainer`) in a subprocess."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from trainer.__main__ import config_dir

REPO = Path(__file__).resolve().parent.parent

# Every Ray process the tests start (in this process or in the CLI's) binds to loopback and sends no
# usage statistics.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Tests run two at a time (pytest-xdist): each worker keeps its own cache of the data sets the project
# writes (digit canvases, QA facts), so two never write the same files at once; and its own Ray temp dir, so
# that Ray's processes that look for "the" cluster of this machine (its ray_current_cluster file) find their
# own test's cluster, not the other worker's.
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["XDG_CACHE_HOME"] = f"/tmp/trainer-test-cache-{worker}"
    os.environ["RAY_TMPDIR"] = f"/tmp/ray-{worker}"

# A DCGAN small enough that an end-to-end run takes seconds on 2 CPU cores.
TINY_DCGAN = [
    "+exp=dcgan",
    "model.generator.width=8",
    "model.discriminator.width=8",
    "data.image_size=16",
    "data.batch_size=16",
    "++trainer.limit_train_batches=4",
    "++trainer.limit_val_batches=1",
    "++trainer.log_every_n_steps=2",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
]


@pytest.fixture(autouse=True)
def restore_logging():
    """A test that runs `train()` in this process sets up the run's console and train.log on the root
    logger (trainer/console.py); the next test starts from pytest's own."""
    import logging
    import warnings

    root = logging.getLogger()
    handlers, level, showwarning = root.handlers[:], root.level, warnings.showwarning
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    warnings.showwarning = showwarning


def compose_config(*overrides: str, run_dir: Path | None = None) -> DictConfig:
    extra = [f"run_dir={run_dir}"] if run_dir is not None else []
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("config", overrides=[*overrides, *extra])


def cli_env(home: Path) -> dict[str, str]:
    """No W&B credentials (so `mode=auto` means offline), an empty home, the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), WANDB_SILENT="true", PYTHONPATH=str(REPO))
    return env


def run_cli(
    *args: str, home: Path, cwd: Path | None = None, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
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


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def divergence_settings(exp: str) -> dict:
    """The `divergence` settings an exp runs with, as plain data."""
    return OmegaConf.to_container(compose_config(f"+exp={exp}").divergence, resolve=True)


def divergence_events(run_dir: Path, rank: int = 0) -> list[dict]:
    """The guard's events file of a run (none written: no events)."""
    path = run_dir / "divergence" / f"events-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# The files that take longest, longest first (--durations=0 of the whole suite on 2 cores): the xdist workers
# take them before the short ones, so that no long file starts last and runs alone at the end.
SLOWEST_FILES = [
    "test_sweeps.py",
    "test_fsdp.py",
    "test_slurm.py",
    "test_ray.py",  # after two other files that start Ray clusters, so that three do not start at once
    "test_sync.py",
    "test_detection.py",
    "test_guard_zoo.py",
    "test_divergence.py",
    "test_bad_input.py",
    "test_install.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
