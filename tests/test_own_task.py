"""A task written outside the package (tests/own_task: a LightningModule and its configs, found through
Hydra's search path) runs through `trainer` and gets what the built-in tasks get: the divergence guard, the
gradient monitor, metrics.json, checkpoints and resume, W&B."""

import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, assert_clean_failure, last_step, run_cli, run_replay
from wandb_offline import find_runs, read_run

OWN = REPO / "tests" / "own_task"
OWN_EXP = [
    f"hydra.searchpath=[file://{OWN / 'conf'}]",
    "+exp=digit_classifier",
    "++trainer.enable_progress_bar=false",
]
BATCHES = 1437 // 64  # training digits per epoch (80% of 1,797) in full batches


def run_own(*args: str, home: Path) -> subprocess.CompletedProcess:
    return run_cli(*OWN_EXP, *args, home=home, cwd=OWN)  # the working directory makes `classifier` importable


@pytest.mark.slow
def test_an_own_task_trains_is_monitored_and_resumes(tmp_path: Path, home: Path) -> None:
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", "callbacks.gradients.log_every_n_steps=5"]
    first = run_own(*args, "++trainer.max_epochs=2", home=home)
    assert first.returncode == 0, first.stderr[-3000:]
    assert last_step(run_dir) == 2 * BATCHES and list((run_dir / "checkpoints").glob("best-*.ckpt"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/accuracy"]["mode"] == "max" and metrics["val/accuracy"]["best_step"] == 2 * BATCHES

    second = run_own(*args, "++trainer.max_epochs=3", home=home)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout + second.stderr and last_step(run_dir) == 3 * BATCHES
    runs = [read_run(path) for path in find_runs(run_dir / "wandb")]
    assert len({run.run_id for run in runs}) == 1  # one W&B run, continued
    accuracy = [value for run in runs for _, value in run.series("val/accuracy")]
    assert len(accuracy) == 3 and accuracy[2] > accuracy[0] > 0.3  # it learns (chance is 0.1)
    keys = set(runs[0].history_keys())
    assert {
        "train/loss",
        "grad_norm/network/total",
        "grad_norm/network/0",
        "update_ratio/network/total",
    } <= keys
    assert runs[0].config["task"]["_target_"] == "classifier.DigitClassifier"


@pytest.mark.slow
def test_an_own_task_halts_on_a_poisoned_batch_and_replays(tmp_path: Path, home: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_own("divergence.inject.step=3", "logger=none", f"hydra.run.dir={run_dir}", home=home)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: divergence at step 3: non-finite gradients in network" in result.stderr
    bundle = run_dir / "divergence" / "step000003-nonfinite"
    replayed = run_replay(bundle, home, cwd=OWN)
    assert "first layer with a non-finite output: network.0" in replayed.stdout


def test_a_misspelt_own_exp_is_one_line_that_lists_the_own_ones(home: Path) -> None:
    result = run_cli(f"hydra.searchpath=[file://{OWN / 'conf'}]", "+exp=digit_clasifier", home=home, cwd=OWN)
    assert_clean_failure(result, "exp=digit_clasifier is not an option", "dcgan", "digit_classifier")
