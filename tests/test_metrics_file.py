"""metrics.json's directions: the table of usual names, what a task or the config declares, the warning for a
guess, and the summary's rows of every validation metric."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import lightning as L
import pytest
import torch

from trainer.callbacks.metrics import MetricsFile, table_mode
from trainer.reporting.summary import RunEnd, render_summary


@pytest.mark.parametrize(
    "name, mode",
    [
        # the issue's: errors, lower is better
        ("val/mse", "min"),
        ("val_rmse", "min"),
        ("val/mae", "min"),
        ("train/loss_d", "min"),
        ("valLoss", "min"),
        ("val/top1_error", "min"),
        ("val/pixel_fd", "min"),
        ("val/fid", "min"),
        ("val/perplexity", "min"),
        # scores, higher is better
        ("val/accuracy", "max"),
        ("val/f1_no_answer", "max"),
        ("val/F1Score", "max"),
        ("val/AP50", "max"),
        ("val/mAP", "max"),
        ("val/mIoU", "max"),
        ("val/return", "max"),
        ("val/inception_score", "max"),
        ("val/r2", "max"),
        ("val/sample_diversity", "max"),
        # descriptions without a better direction
        ("val/return_std", None),
        ("val/episode_length", None),
        ("train/lr", None),
    ],
)
def test_the_table_knows_the_usual_names(name: str, mode: str | None) -> None:
    assert table_mode(name) == (mode, True)


@pytest.mark.parametrize(
    "name",
    # Words that only contain a known one (the old substring rule took "info" for inf, "lossless" for a loss,
    # "timestep" for time), and names without any known word: guessed, not known.
    ["val/info_gain", "val/lossless_ratio", "val/timesteps_saved", "val/interference", "train/D_x"],
)
def test_names_that_only_contain_a_known_word_are_a_guess(name: str) -> None:
    assert table_mode(name) == ("max", False)


def started(metrics_file: MetricsFile, module: object = None, rank_zero: bool = True) -> MetricsFile:
    metrics_file.setup(SimpleNamespace(is_global_zero=rank_zero), module or L.LightningModule(), "fit")
    return metrics_file


def test_a_declared_direction_wins_over_the_table_and_monitor_mode_over_all(tmp_path: Path) -> None:
    class Regressor(L.LightningModule):
        validation_metrics: ClassVar[dict] = {"val/r2": "min", "val/score": "min", "val/size": None}

    metrics_file = started(
        MetricsFile(tmp_path / "metrics.json", modes={"val/score": "max"}, monitor=("val/mse", "max")),
        Regressor(),
    )
    for step, value in enumerate([3.0, 1.0, 2.0]):
        metrics_file.record({name: value for name in ("val/r2", "val/score", "val/size", "val/mse")}, step)
    recorded = metrics_file.metrics
    assert recorded["val/r2"] == {"mode": "min", "final": 2.0, "best": 1.0, "best_step": 1}  # the task's
    assert recorded["val/score"]["mode"] == "max" and recorded["val/score"]["best"] == 3.0  # the config's
    assert recorded["val/size"] == {"mode": None, "final": 2.0}  # no direction: no best
    assert recorded["val/mse"]["mode"] == "max"  # monitor.mode decides the best checkpoint: so here too


def test_a_direction_declared_after_a_resume_restarts_the_best(tmp_path: Path) -> None:
    first = started(MetricsFile(tmp_path / "metrics.json"))
    first.record({"val/goodness": 1.0}, 0)
    first.record({"val/goodness": 5.0}, 1)  # the guess (max) takes 5 as best
    resumed = started(MetricsFile(tmp_path / "metrics.json", modes={"val/goodness": "min"}))
    resumed.load_state_dict(first.state_dict())
    resumed.record({"val/goodness": 4.0}, 2)
    assert resumed.metrics["val/goodness"] == {"mode": "min", "final": 4.0, "best": 4.0, "best_step": 2}


def test_a_guessed_direction_is_warned_about_once_per_metric(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics_file = started(MetricsFile(tmp_path / "metrics.json"))
    with caplog.at_level(logging.WARNING, logger="trainer.callbacks.metrics"):
        for step in range(3):
            values = {"val/goodness": 1.0, "val/info": 2.0, "val/mse": 3.0, "train/D_x": 0.5, "comm/bytes": 9}
            metrics_file.record(values, step)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned  # val/mse is known; the step's diagnostics are not validation metrics
    assert "direction of val/goodness is a guess" in warned[0] and "validation_metrics" in warned[0]
    assert "direction of val/info is a guess" in warned[1] and "metrics.modes" in warned[1]
    assert metrics_file.metrics["val/goodness"]["mode"] == "max"


def test_other_ranks_do_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    metrics_file = started(MetricsFile(tmp_path / "metrics.json"), rank_zero=False)
    with caplog.at_level(logging.WARNING, logger="trainer.callbacks.metrics"):
        metrics_file.record({"val/goodness": 1.0}, 0)
    assert not caplog.records


def test_a_monitor_mode_against_the_metrics_known_direction_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="trainer.callbacks.metrics"):
        started(MetricsFile(tmp_path / "a.json", monitor=("val/accuracy", "min")))  # monitor.mode's default
        started(MetricsFile(tmp_path / "b.json", monitor=("val/mse", "min")))
    (warned,) = [r.getMessage() for r in caplog.records]
    assert "monitor.mode=min, but val/accuracy is better when higher" in warned
    assert "set monitor.mode=max" in warned


class R2Logger(L.LightningModule):
    """Logs a validation metric the table would call higher-is-better, and declares it lower-is-better."""

    validation_metrics: ClassVar[dict[str, str]] = {"val/r2": "min"}

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/r2", [5.0, 1.0, 3.0][self.current_epoch])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.ones(2, 1), batch_size=2)

    val_dataloader = train_dataloader


def test_the_task_declares_directions_through_the_lightning_module(tmp_path: Path) -> None:
    metrics_file = MetricsFile(tmp_path / "metrics.json")
    trainer = L.Trainer(
        max_epochs=3,
        callbacks=[metrics_file],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(R2Logger())
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["val/r2"] == {"mode": "min", "final": 3.0, "best": 1.0, "best_step": 2}


def test_the_summary_lists_every_validation_metric_with_its_best(tmp_path: Path) -> None:
    def entry(mode: str | None, final: float, best: float | None = None, step: int = 0) -> dict:
        found = {"best": best, "best_step": step} if best is not None else {}
        return {"mode": mode, "final": final, **found}

    metrics = {
        "val/mse": entry("min", 0.433, 0.401, 120),
        "val/mae": entry("min", 0.52, 0.5, 100),
        "val/r2": entry("max", 0.41, 0.47, 110),
        "val/episode_length": entry(None, 200.0),
        "train/loss": entry("min", 0.3, 0.25, 130),
        "train/D_x": entry("max", 0.6, 0.9, 10),
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    summary = render_summary(tmp_path, RunEnd("finished", 5.0, 130, 10), "val/mse").splitlines()
    rows = [line.split()[0] for line in summary[1:5]]
    assert rows == ["val/mse", "val/episode_length", "val/mae", "val/r2"]  # monitored first, then by name
    assert summary[1].endswith("(monitored)  final 0.433, best 0.401 at step 120")
    assert summary[2].endswith("final 200")  # a description: no best
    assert summary[3].endswith("final 0.52, best 0.5 at step 100")
    assert summary[4].endswith("final 0.41, best 0.47 at step 110")
    assert summary[5].split()[:2] == ["train/loss", "final"]  # then the losses; not other train/ numbers
    assert not any("train/D_x" in line for line in summary)
