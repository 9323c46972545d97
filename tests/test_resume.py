"""A resumed run continues exactly: N steps straight give the same weights as N/2 + resume + N/2."""

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_DCGAN, compose_config
from omegaconf import open_dict

from trainer.callbacks.last_checkpoint import LastCheckpoint
from trainer.run import train

FAST = [*TINY_DCGAN, "logger=none", "~callbacks.gradients"]
# Random augmentations on every image (jitter by default, and flips and resizes here), 4 batches an epoch.
TINY_DETECTOR = [
    "+exp=detector",
    "data.canvases.train_images=64",
    "data.canvases.val_images=16",
    "data.sizes=[80,96,112]",
    "data.hflip=0.5",
    "++trainer.limit_val_batches=1",
    "++trainer.enable_progress_bar=false",
    "logger=none",
    "~callbacks.gradients",
]
# Dropout, a linear warm-up schedule and validation within each epoch.
TINY_QA = [
    "+exp=qa",
    "data.facts.train_paragraphs=40",
    "data.batch_size=8",
    "++trainer.limit_train_batches=4",
    "++trainer.limit_val_batches=1",
    "++trainer.enable_progress_bar=false",
    "logger=none",
    "~callbacks.gradients",
]


class CrashAfterBatch(L.Callback):
    """Stands in for a killed job: raises after the given number of batches (counted over the whole run)."""

    def __init__(self, batches: int):
        self.batches = batches

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.fit_loop.total_batch_idx + 1 == self.batches:
            raise SystemExit("simulated crash")


def fit(run_dir: Path, *overrides: str, crash_after: int | None = None, exp: list[str] = FAST) -> None:
    cfg = compose_config(*exp, *overrides, run_dir=run_dir)
    if crash_after:
        with open_dict(cfg):
            cfg.callbacks.crash = {"_target_": f"{__name__}.CrashAfterBatch", "batches": crash_after}
        with pytest.raises(SystemExit, match="simulated crash"):
            train(cfg)
    else:
        train(cfg)


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


@pytest.mark.parametrize(
    "options", [[], ["++trainer.val_check_interval=0.5"]], ids=["validation-per-epoch", "validation-within"]
)
def test_resume_at_an_epoch_boundary_gives_identical_weights(options: list[str], tmp_path: Path) -> None:
    fit(tmp_path / "straight", "++trainer.max_epochs=2", *options)
    fit(tmp_path / "resumed", "++trainer.max_epochs=1", *options)
    fit(tmp_path / "resumed", "++trainer.max_epochs=2", *options)
    straight, resumed = last_checkpoint(tmp_path / "straight"), last_checkpoint(tmp_path / "resumed")
    assert straight["global_step"] == 16  # 2 epochs x 4 batches x 2 optimizers
    assert_same_training_state(straight, resumed)


def test_resume_at_an_epoch_boundary_with_max_steps_trains_the_whole_next_epoch(tmp_path: Path) -> None:
    """Validation within epochs (as +exp=qa), max_steps and limit_train_batches set: Lightning 2.6 resumed
    such a checkpoint into the finished epoch's loop and trained one batch of the next epoch, or none; and
    the loader took the end of a limited epoch for a place within it and skipped the next epoch's first
    batches."""
    options = ["++trainer.val_check_interval=0.5", "++trainer.max_steps=1000"]
    fit(tmp_path / "straight", "++trainer.max_epochs=2", *options)
    fit(tmp_path / "run", "++trainer.max_epochs=1", *options)
    fit(tmp_path / "run", "++trainer.max_epochs=2", *options)
    resumed = last_checkpoint(tmp_path / "run")
    assert resumed["global_step"] == 16  # 2 epochs x 4 batches x 2 optimizers
    assert_same_training_state(last_checkpoint(tmp_path / "straight"), resumed)


@pytest.mark.parametrize(
    "exp, steps_per_batch",
    [
        (FAST, 2),
        pytest.param(TINY_DETECTOR, 1, marks=pytest.mark.slow),
        pytest.param(TINY_QA, 1, marks=pytest.mark.slow),
    ],
    ids=["dcgan", "detector", "qa"],
)
def test_resume_mid_epoch_after_a_crash_gives_identical_weights(
    exp: list[str], steps_per_batch: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # generated data sets, written once
    every_5_batches = f"callbacks.last_checkpoint.every_n_train_steps={5 * steps_per_batch}"
    fit(tmp_path / "straight", "++trainer.max_epochs=2", exp=exp)
    fit(tmp_path / "resumed", "++trainer.max_epochs=2", every_5_batches, crash_after=7, exp=exp)
    resumed = last_checkpoint(tmp_path / "resumed")
    assert resumed["global_step"] == 5 * steps_per_batch  # batch 5 of 8, mid-epoch 2
    fit(tmp_path / "resumed", "++trainer.max_epochs=2", every_5_batches, exp=exp)
    assert_same_training_state(last_checkpoint(tmp_path / "straight"), last_checkpoint(tmp_path / "resumed"))


def test_resume_never_starts_fresh_and_keeps_the_old_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit(run, "++trainer.max_epochs=1")
    before = last_checkpoint(run)
    fit(run, "++trainer.max_epochs=1", "resume=never", "task.lr=1e-3")
    kept = list(run.glob("checkpoints.before-*/last.ckpt"))
    assert len(kept) == 1 and torch.load(kept[0], weights_only=True)["global_step"] == before["global_step"]
    fresh = last_checkpoint(run)
    # Resuming a finished 1-epoch run would train nothing; a fresh one trains an epoch at the new lr.
    assert fresh["global_step"] == before["global_step"]
    assert not torch.equal(
        fresh["state_dict"]["generator.net.0.weight"], before["state_dict"]["generator.net.0.weight"]
    )


def test_last_checkpoint_callbacks_share_no_state(tmp_path: Path) -> None:
    """Loggers read `best_k_models` as they do on Lightning's ModelCheckpoint; one callback's must not be
    another's (a class-level dict would be shared by every instance)."""
    first, second = LastCheckpoint(str(tmp_path / "a")), LastCheckpoint(str(tmp_path / "b"))
    first.best_k_models[str(tmp_path / "a" / "last.ckpt")] = 1.0
    assert second.best_k_models == {}
