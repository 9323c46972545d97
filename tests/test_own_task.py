"""A task written outside the package (tests/own_task: a LightningModule and its configs, found through
Hydra's search path) runs through `trainer` and gets what the built-in tasks get: the divergence guard, the
gradient monitor, metrics.json, checkpoints and resume, W&B."""

import json
import subprocess
from pathlib import Path

import pytest
from helpers import OWN, OWN_EXP, assert_clean_failure, last_step, run_cli, run_own, run_replay
from wandb_offline import find_runs, read_run

BATCHES = 1437 // 64  # training digits per epoch (80% of 1,797) in full batches


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
    result = run_own(
        "divergence.inject.step=3",
        "divergence.action=halt",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        home=home,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: divergence at step 3: non-finite gradients in network" in result.stderr
    bundle = run_dir / "divergence" / "step000003-nonfinite"
    replayed = run_replay(bundle, home, cwd=OWN)
    assert "first layer with a non-finite output: network.0" in replayed.stdout


def test_a_misspelt_own_exp_is_one_line_that_lists_the_own_ones(home: Path) -> None:
    result = run_cli(f"hydra.searchpath=[file://{OWN / 'conf'}]", "+exp=digit_clasifier", home=home, cwd=OWN)
    assert_clean_failure(result, "exp=digit_clasifier is not an option", "dcgan", "digit_classifier")


def test_an_own_module_off_the_path_is_named_with_where_it_was_looked_for(tmp_path: Path, home: Path) -> None:
    result = run_cli(*OWN_EXP, home=home, cwd=tmp_path, script=True)  # not the folder of classifier.py
    assert_clean_failure(
        result,
        "task._target_=classifier.DigitClassifier cannot be imported: no module named classifier",
        f"looked in the working directory {tmp_path} and",
        "run from the folder that holds classifier.py, or add it to PYTHONPATH",
    )
    assert result.returncode == 2 and not (tmp_path / "outputs").exists()


# A second own task, not the shipped example: a linear model of synthetic data, written with `from trainer`
# only, with a range (`Positive`) on its data module's batch size.
SECOND_TASK = {
    "linear_regressor.py": '''
import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from trainer import Positive, PositiveFloat, ResumableLoader, Seed, StepReport, Task, evaluation_loader


class SyntheticLinear(L.LightningDataModule):
    """y = x . w + noise; the first 128 samples validate."""

    def __init__(
        self, features: Positive = 8, size: Positive = 512, batch_size: Positive = 32, seed: Seed = 0
    ):
        super().__init__()
        self.features, self.size, self.batch_size, self.seed = features, size, batch_size, seed

    def setup(self, stage):
        generator = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.size, self.features, generator=generator)
        noise = 0.1 * torch.randn(self.size, generator=generator)
        y = x @ torch.randn(self.features, generator=generator) + noise
        self.train_set, self.val_set = TensorDataset(x[128:], y[128:]), TensorDataset(x[:128], y[:128])

    def train_dataloader(self):
        return ResumableLoader(self.train_set, self.batch_size, seed=self.seed)

    def val_dataloader(self):
        return evaluation_loader(self.val_set, batch_size=128)


class Linear(nn.Linear):
    def __init__(self, features: Positive = 8):
        super().__init__(features, 1)


class Regressor(Task):
    validation_metrics = {"val/mse": "min"}

    def __init__(self, model: nn.Module, lr: PositiveFloat = 0.05):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.hparams.lr)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.model(x).squeeze(1), y)
        self.report(StepReport(losses={"mse": loss}))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/mse", F.mse_loss(self.model(x).squeeze(1), y))
''',
    "conf/task/regressor.yaml": "_target_: linear_regressor.Regressor\nlr: 0.05\n",
    "conf/model/linear.yaml": "model:\n  _target_: linear_regressor.Linear\n  features: ${data.features}\n",
    "conf/data/synthetic_linear.yaml": (
        "_target_: linear_regressor.SyntheticLinear\nfeatures: 8\nsize: 512\nbatch_size: 32\nseed: ${seed}\n"
    ),
    "conf/exp/linear.yaml": """# @package _global_
defaults:
  - override /task: regressor
  - override /model: linear
  - override /data: synthetic_linear
name: linear
trainer:
  max_epochs: 3
monitor:
  metric: val/mse
  mode: min
""",
}


@pytest.fixture(scope="module")
def second_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("second_task")
    for name, text in SECOND_TASK.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text.lstrip())
    return folder


def run_second(folder: Path, *args: str, home: Path) -> subprocess.CompletedProcess:
    search = f"hydra.searchpath=[file://{folder / 'conf'}]"
    return run_cli(
        search,
        "+exp=linear",
        "++trainer.enable_progress_bar=false",
        *args,
        home=home,
        cwd=folder,
        script=True,
    )


@pytest.mark.slow
def test_a_second_own_task_trains_through_the_console_script(
    second_task: Path, tmp_path: Path, home: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run_second(second_task, "logger=none", f"hydra.run.dir={run_dir}", home=home)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/mse"]["mode"] == "min" and "train/mse" in metrics  # (the step's report)
    assert metrics["val/mse"]["final"] < 0.5  # it learns: y's variance is about 8


TYPO = "task.lrr is not an option of linear_regressor.Regressor: did you mean task.lr?"
BAD_INPUT = {
    "a batch size out of its range (Positive)": (["data.batch_size=0"], "data.batch_size=0 is out of range"),
    "a misspelt key": (["task.lrr=0.1"], TYPO),
    "a misspelt key, +": (["+task.lrr=0.1"], TYPO),
    "a misspelt key, ++": (["++task.lrr=0.1"], TYPO),
    "a misspelt Trainer key": (["trainer.max_epocs=3"], "did you mean trainer.max_epochs?"),
    "a misspelt Trainer key, ++": (["++trainer.max_epocs=3"], "did you mean trainer.max_epochs?"),
    "a misspelt key of no class": (["monitor.metricc=val/mse"], "did you mean monitor.metric?"),
    "a misspelt key of no class, ++": (["++monitor.metricc=val/mse"], "did you mean monitor.metric?"),
    "a metric the task does not log": (
        ["monitor.metric=val/mae"],
        "monitor.metric=val/mae is never logged by linear_regressor.Regressor (its validation logs val/mse): "
        "did you mean monitor.metric=val/mse?",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUT)  # (under a second each: refused before anything is imported)
def test_bad_input_to_an_own_task_is_one_line_before_anything_exists(
    case: str, second_task: Path, tmp_path: Path, home: Path
) -> None:
    args, message = BAD_INPUT[case]
    run_dir = tmp_path / "run"
    result = run_second(second_task, *args, f"hydra.run.dir={run_dir}", home=home)  # (W&B on: offline)
    assert_clean_failure(result, message)
    assert result.returncode == 2
    assert not run_dir.exists() and not (second_task / "wandb").exists()
