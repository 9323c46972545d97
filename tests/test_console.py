"""What a run says: the quiet console, train.log, the end-of-run summary, `--help`, and the W&B mode rules."""

import importlib
import logging
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY_DCGAN, TINY_QA, cli_env, compose_config

from trainer.callbacks.best_checkpoint import BestCheckpoint
from trainer.metrics.image_quality import frechet_distance
from trainer.reporting.console import setup_logging
from trainer.run import train

SUMMARY_START = "── run "


def run_cli_plain(*args: str, home: Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """The command as a user runs it: W&B not silenced (the conftest's runs set WANDB_SILENT)."""
    env = {k: v for k, v in cli_env(home).items() if k != "WANDB_SILENT"}
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def summary_block(stderr: str) -> str:
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(SUMMARY_START))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("  ")), len(lines))
    return "\n".join(lines[start:end])


def test_the_console_shows_the_framework_and_useful_warnings_and_train_log_keeps_everything(tmp_path, capsys):
    logs = tmp_path
    warnings.simplefilter("always")  # inside pytest's own catch_warnings, so only for this test
    setup_logging(logs, verbose=False, rank=0)
    logging.getLogger("trainer.run").info("resuming from X")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
    # A library's own deprecation (noise) and a warning about the user's data loader (kept).
    warnings.warn_explicit(
        "`isinstance(treespec, LeafSpec)` is deprecated",
        DeprecationWarning,
        "/x/lightning/pytorch/utilities/_pytree.py",
        21,
    )
    warnings.warn_explicit(
        "The 'train_dataloader' does not have many workers",
        UserWarning,
        "/x/lightning/pytorch/trainer/connectors/data_connector.py",
        425,
    )
    console = capsys.readouterr().err.splitlines()
    assert console == [
        "trainer: resuming from X",
        "warning: The 'train_dataloader' does not have many workers",
    ]
    logged = (logs / "train.log").read_text()
    for message in ("resuming from X", "GPU available", "is deprecated", "does not have many workers"):
        assert message in logged

    setup_logging(logs, verbose=True, rank=0)  # -v: everything, noise included
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
    warnings.warn_explicit(
        "`x` is deprecated", DeprecationWarning, "/x/lightning/pytorch/utilities/_pytree.py", 22
    )
    assert len(capsys.readouterr().err.splitlines()) == 2


def test_other_ranks_write_only_their_warnings_marked_with_their_rank(tmp_path, capsys):
    logs = tmp_path
    setup_logging(logs, rank=1)
    logging.getLogger("trainer.run").info("only rank zero says this")
    logging.getLogger("trainer.divergence.guard").warning("divergence at step 3")
    assert capsys.readouterr().err.splitlines() == ["trainer: warning: [rank 1] divergence at step 3"]
    logged = (logs / "train.log").read_text()
    assert "[rank 1] trainer.divergence.guard: divergence at step 3" in logged
    assert "only rank zero" not in logged


def test_library_loggers_print_through_the_run_console_and_keep_their_own_files(tmp_path, capsys):
    """As Ray Train sets up its loggers in its processes: DEBUG, a console handler and a file of its own."""
    library = logging.getLogger("ray.train.example")
    own_file = logging.FileHandler(tmp_path / "ray-train.log")
    library.handlers[:] = [logging.StreamHandler(sys.stderr), own_file]
    library.setLevel(logging.DEBUG)
    library.propagate = False
    try:
        setup_logging(tmp_path, rank=0)
        library.debug("polling")
        library.info("Checkpoint successfully created")
        library.error("Error in training function:\n" + TRACEBACK_TEXT)
        assert capsys.readouterr().err.splitlines() == [
            "error: Error in training function: RuntimeError: Connection reset by peer"
        ]
        logged = (tmp_path / "train.log").read_text()
        assert "Checkpoint successfully created" in logged and TRACEBACK_TEXT in logged
        assert "polling" not in logged and "polling" in (tmp_path / "ray-train.log").read_text()
    finally:
        library.handlers.clear()
        own_file.close()


TRACEBACK_TEXT = """Traceback (most recent call last):
  File "/x/trainer/run.py", line 84, in train
    pl_trainer.fit(module)
RuntimeError: Connection reset by peer

At:
  /x/torch/distributed/default_hooks.py(31): <lambda>
"""


def ray_batch(actor: str, pid: int, is_err: bool, *lines: str) -> dict:
    """What Ray's log monitor hands the driver: lines one process printed on this node."""
    local = {"ip": "127.0.0.1", "localhost": "127.0.0.1"}
    return {**local, "actor_name": actor, "pid": pid, "is_err": is_err, "lines": list(lines)}


def test_ray_processes_output_reaches_train_log_and_the_workers_lines_the_console(tmp_path, capsys):
    from trainer.launchers.ray import route_output

    importlib.import_module("ray")  # which gives its loggers console handlers of their own, as on the driver
    setup_logging(tmp_path, rank=0)
    route_output(ray_batch("TrainController", 11, True, "Requesting resources: {'CPU': 1} * 2"))
    route_output(
        ray_batch(
            "RayTrainWorker",
            12,
            True,
            "Setting up process group for: env:// [rank=0, world_size=2]",  # Ray Train's, before train()
            "trainer: run dir /x",
            "warning: [rank 1] a warning of rank 1",
        )
    )
    route_output(ray_batch("RayTrainWorker", 12, False, "Epoch 0/0 ━━━━ 2/2"))
    console = capsys.readouterr()
    assert console.err.splitlines() == ["trainer: run dir /x", "warning: [rank 1] a warning of rank 1"]
    assert console.out.splitlines() == ["Epoch 0/0 ━━━━ 2/2"]
    logged = (tmp_path / "train.log").read_text()
    assert "ray.processes: (TrainController pid=11) Requesting resources" in logged
    assert "ray.processes: (RayTrainWorker pid=12) Setting up process group" in logged


def test_help_fits_one_screen_and_shows_a_composed_config_only_for_an_exp(tmp_path: Path):
    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "trainer", *args],
            env=cli_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    short = run("--help")
    assert len(short.splitlines()) <= 45 and max(len(line) for line in short.splitlines()) <= 100
    assert "experiments (+exp=NAME): dcgan, detector, dqn, ppo, qa" in short
    assert "launcher" in short and "slurm" in short and "hparams_search" in short
    assert "space" not in short and "README.md" not in short  # internal groups; a file wheels lack
    assert "generator:" not in short  # no config without an exp
    composed = run("+exp=ppo", "--help")
    assert "composed config:" in composed and "total_env_steps:" in composed
    assert run("--version").strip() == f"trainer {__import__('trainer').__version__}"


def test_tab_completion_offers_group_options(tmp_path: Path):
    """What docs/experiments.md's `eval "$(trainer -sc install=bash)"` asks for at each <TAB>."""
    env = {**cli_env(tmp_path), "COMP_LINE": "trainer +exp=dcgan launcher="}
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "-sc", "query=bash"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.split() == ["launcher=local", "launcher=ray", "launcher=slurm"], done.stderr


@pytest.mark.parametrize(
    ("explicit", "env_mode", "saved", "api_key", "expected"),
    [
        ("offline", "online", None, True, "offline"),  # an explicit logger.wandb.mode wins
        ("auto", "disabled", "online", True, "disabled"),  # then WANDB_MODE
        ("auto", None, "offline", True, "offline"),  # then `wandb offline`, even with a key
        ("auto", None, None, True, "online"),  # then a key means online
        ("auto", None, None, False, "offline"),  # and no key offline
    ],
)
def test_wandb_mode_rules(tmp_path, monkeypatch, explicit, env_mode, saved, api_key, expected):
    import wandb

    from trainer.reporting.loggers import resolve_wandb_mode

    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)
    if env_mode:
        monkeypatch.setenv("WANDB_MODE", env_mode)
    if api_key:
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    if saved:  # what `wandb offline` writes: ./wandb/settings
        (tmp_path / "wandb").mkdir()
        (tmp_path / "wandb" / "settings").write_text(f"[default]\nmode = {saved}\n")
    wandb.teardown()  # W&B reads its settings once per process
    try:
        assert resolve_wandb_mode(explicit) == expected
    finally:
        wandb.teardown()


def test_frechet_distance_of_diverged_samples_is_nan_not_a_crash():
    real = torch.randn(64, 8, dtype=torch.float64)
    fake = real.clone()
    fake[3, 2] = math.nan
    assert math.isnan(frechet_distance(real, fake))
    assert frechet_distance(real, real).abs() < 1e-6


def test_a_nan_or_infinite_metric_is_never_the_best(tmp_path: Path):
    best = BestCheckpoint(tmp_path, "val/loss", "min")
    assert not best.check_monitor_top_k(None, torch.tensor(math.nan))
    assert not best.check_monitor_top_k(None, torch.tensor(math.inf))
    assert best.check_monitor_top_k(None, torch.tensor(1.0))  # the first finite value is kept


def test_rl_progress_counts_env_steps_toward_the_budget(tmp_path: Path):
    cfg = compose_config(
        "+exp=ppo",
        "task.total_env_steps=2048",
        "task.env_steps_per_epoch=1024",
        "task.eval_episodes=2",
        "logger=none",
        run_dir=tmp_path,
    )
    trainers = []
    train(cfg, prepare=lambda t: trainers.append(t) or t)
    bar = trainers[0].progress_bar_callback
    descriptions = {task.description: task for task in bar.progress.tasks}
    assert "env steps" in descriptions, descriptions
    assert descriptions["env steps"].total == 2048 and descriptions["env steps"].completed == 2048
    assert not any("/-" in d for d in descriptions)  # no "Epoch 1/-2"


def test_a_healthy_run_says_what_matters_and_train_log_keeps_it(tmp_path: Path):
    run_dir = tmp_path / "run"
    done = run_cli_plain(*TINY_DCGAN, "++trainer.max_epochs=1", f"hydra.run.dir={run_dir}", home=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stderr.splitlines()
    summary = summary_block(done.stderr)
    # Only the framework speaks: no warning, no W&B banner, no Lightning chatter.
    others = [line for line in console if not line.startswith(("trainer: ", SUMMARY_START, "  "))]
    assert others == [], others
    assert not any("warning" in line.lower() for line in console)
    assert summary.startswith("── run finished in")
    assert re.search(r"\n  val/fid \(monitored\) +final ", summary)
    assert re.search(rf"\n  best checkpoint +{re.escape(str(run_dir))}/checkpoints/best-", summary)
    assert re.search(r"\n  divergence +no events\n", summary)
    assert f"offline; upload with: wandb sync {run_dir}/wandb/offline-run-" in summary
    assert (run_dir / "summary.txt").read_text().rstrip() == summary
    logged = (run_dir / "train.log").read_text()
    for line in console:  # everything the console showed
        assert line.removeprefix("trainer: ").strip() in logged, line
    assert "GPU available" in logged  # and what it did not


@pytest.mark.slow
def test_a_pretrained_model_loads_without_a_progress_bar(tmp_path: Path):
    """transformers draws a "Loading weights" bar for every pretrained model it loads (every rank's)."""
    done = run_cli_plain(*TINY_QA, f"hydra.run.dir={tmp_path / 'run'}", home=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Loading weights" not in done.stdout + done.stderr, done.stderr[-3000:]
    assert "trainer: run dir" in done.stderr


@pytest.mark.slow
def test_divergence_events_and_the_summary_reach_train_log(tmp_path: Path):
    skip_dir, halt_dir = tmp_path / "skip", tmp_path / "halt"
    inject = ["divergence.inject.step=2", "divergence.inject.kind=nan_batch"]
    skipped = run_cli_plain(
        *TINY_DCGAN,
        *inject,
        "divergence.action=skip",
        "++trainer.max_epochs=1",
        f"hydra.run.dir={skip_dir}",
        home=tmp_path,
    )
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    logged = (skip_dir / "train.log").read_text()
    assert "WARNING [rank 0] trainer.divergence.guard: divergence at step 2 (skip)" in logged
    summary = summary_block(skipped.stderr)
    assert summary.startswith("── run finished") and re.search(
        r"divergence +1 event; the first at step 2", summary
    )
    assert f"python -m trainer.replay {skip_dir}/divergence/step000002-nonfinite" in summary
    assert summary in logged

    halted = run_cli_plain(
        *TINY_DCGAN,
        *inject,
        "divergence.action=halt",
        "++trainer.max_epochs=1",
        f"hydra.run.dir={halt_dir}",
        home=tmp_path,
    )
    assert halted.returncode == 2
    lines = halted.stderr.splitlines()
    assert lines[-1].startswith("error: divergence at step 2") and "trainer.replay" in lines[-1]
    assert summary_block(halted.stderr).startswith("── run stopped by the divergence guard in")
    assert "ERROR [rank 0] trainer: divergence at step 2" in (halt_dir / "train.log").read_text()
    assert (halt_dir / "summary.txt").read_text().startswith("── run stopped by the divergence guard")
