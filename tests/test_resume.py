"""A resumed run continues exactly: N steps straight give the same weights as N/2 + resume + N/2."""

import json
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import (
    PAPER_DCGAN,
    TINY_DCGAN,
    assert_clean_failure,
    assert_same_training_state,
    compose_config,
    differences,
    last_checkpoint,
    run_cli,
)
from omegaconf import OmegaConf, open_dict

from trainer.callbacks.last_checkpoint import LastCheckpoint
from trainer.callbacks.preemption import Preemption
from trainer.config.resume import refuse_changed_config
from trainer.errors import Preempted, UserError
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


class SignalAfterBatch(L.Callback):
    """Stands in for SLURM's warning signal before a preemption, at the end of the given batch (its hook runs
    before the Preemption callback's)."""

    def __init__(self, batches: int):
        self.batches = batches

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.fit_loop.total_batch_idx + 1 == self.batches:
            for callback in trainer.callbacks:
                if isinstance(callback, Preemption):
                    callback.listening = callback.requested = True


def fit(run_dir: Path, *overrides: str, crash_after: int | None = None, exp: list[str] = FAST) -> None:
    cfg = compose_config(*exp, *overrides, run_dir=run_dir)
    if crash_after:
        with open_dict(cfg):
            cfg.callbacks.crash = {"_target_": f"{__name__}.CrashAfterBatch", "batches": crash_after}
        with pytest.raises(SystemExit, match="simulated crash"):
            train(cfg)
    else:
        train(cfg)


def assert_same_checkpoint(a_dir: Path, b_dir: Path) -> None:
    """The two runs' last checkpoints hold the same of everything, tensors bit for bit, paths taken within
    each run dir: weights, optimizers, loops, RNG states, and every callback's state (the divergence
    guard's, metrics.json's, the best checkpoint's)."""
    a, b = (within_run_dir(last_checkpoint(run), run) for run in (a_dir, b_dir))
    found = list(differences(a, b, "checkpoint"))
    assert not found, found[:10]


def within_run_dir(value: Any, run_dir: Path) -> Any:
    if isinstance(value, str):
        return value.replace(str(run_dir), "<run dir>")
    if isinstance(value, dict):
        return {within_run_dir(k, run_dir): within_run_dir(v, run_dir) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(within_run_dir(v, run_dir) for v in value)
    return value


@pytest.mark.parametrize(
    "options, stops",
    [
        ([], [6]),  # within epoch 1: its last batch is trained after the resume
        ([], [5, 10]),  # twice, and 5 ends within a batch (two optimizer steps a batch)
        ([], [8]),  # at the end of epoch 1
        # At a validation within the epoch (batch 2), then right after the next one (batch 3).
        (["++trainer.val_check_interval=0.5"], [4, 6]),
    ],
    ids=["within-an-epoch", "twice", "at-an-epoch-end", "validation-within"],
)
def test_runs_stopped_by_max_steps_and_resumed_end_as_an_uninterrupted_run(
    options: list[str], stops: list[int], tmp_path: Path
) -> None:
    """A run that max_steps stops validates its last weights (final_validation), and a resumed run goes on as
    if neither the stop nor that validation had been: it trains the rest of the epoch, and its guard,
    metrics and best checkpoint know what the uninterrupted run's know."""
    fit(tmp_path / "straight", "++trainer.max_epochs=2", *options)
    for max_steps in stops:
        fit(tmp_path / "resumed", "++trainer.max_epochs=2", f"++trainer.max_steps={max_steps}", *options)
        assert last_checkpoint(tmp_path / "resumed")["global_step"] == max_steps + max_steps % 2
    fit(tmp_path / "resumed", "++trainer.max_epochs=2", *options)
    assert last_checkpoint(tmp_path / "straight")["global_step"] == 16  # 2 epochs x 4 batches x 2 optimizers
    assert_same_checkpoint(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.parametrize(
    "options, batches",
    [([], 3), (["++trainer.val_check_interval=0.5"], 2)],
    ids=["within-an-epoch", "at-a-validation"],
)
def test_a_preempted_run_resumes_as_if_uninterrupted(
    options: list[str], batches: int, tmp_path: Path
) -> None:
    """Preemption saves at the end of the batch, then stops, which makes Lightning validate: a validation that
    was not due is not saved past (the uninterrupted run has none), one that was due is."""
    fit(tmp_path / "straight", "++trainer.max_epochs=2", *options)
    cfg = compose_config(*FAST, "++trainer.max_epochs=2", *options, run_dir=tmp_path / "preempted")
    with open_dict(cfg):
        signal = {"_target_": f"{__name__}.SignalAfterBatch", "batches": batches}
        cfg.callbacks = {"signal": signal, **cfg.callbacks}
    with pytest.raises(Preempted):
        train(cfg)
    assert last_checkpoint(tmp_path / "preempted")["global_step"] == 2 * batches
    fit(tmp_path / "preempted", "++trainer.max_epochs=2", *options)
    assert_same_checkpoint(tmp_path / "straight", tmp_path / "preempted")


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


def best_checkpoints(run_dir: Path) -> list[str]:
    return sorted(path.name for path in (run_dir / "checkpoints").glob("best-*.ckpt"))


def best_file_of(run_dir: Path) -> str:
    """The name of the best checkpoint that metrics.json's best value of the monitored metric was saved in."""
    best = json.loads((run_dir / "metrics.json").read_text())["val/fid"]
    return f"best-epoch{best['best_step'] // 8 - 1:03d}-step{best['best_step']:06d}.ckpt"  # 4 batches x 2


def test_a_moved_run_dir_keeps_one_best_checkpoint_across_a_resume(tmp_path: Path) -> None:
    """Lightning drops the ranking of a checkpoint saved in another folder (as a run dir copied from a
    cluster's scratch is): the old best stayed beside the new one, and any next validation was "best"."""
    fit(tmp_path / "first", "++trainer.max_epochs=2", *PAPER_DCGAN)  # (its FID improves after epoch 0)
    shutil.move(tmp_path / "first", tmp_path / "moved")
    fit(tmp_path / "moved", "++trainer.max_epochs=5", *PAPER_DCGAN)
    assert best_file_of(tmp_path / "moved") != "best-epoch000-step000008.ckpt", "no new best after the resume"
    assert best_checkpoints(tmp_path / "moved") == [best_file_of(tmp_path / "moved")]


def test_a_run_resumed_from_its_best_checkpoint_keeps_one_best_checkpoint(tmp_path: Path) -> None:
    """Lightning never removes the checkpoint a run was resumed from: once a new best replaces it, it goes."""
    run = tmp_path / "run"
    fit(run, "++trainer.max_epochs=2", *PAPER_DCGAN)  # (its FID improves after epoch 0)
    (first_best,) = best_checkpoints(run)
    fit(run, "++trainer.max_epochs=5", f"ckpt_path={run / 'checkpoints' / first_best}", *PAPER_DCGAN)
    assert best_file_of(run) != first_best, "no new best after the resume"
    assert best_checkpoints(run) == [best_file_of(run)]


def test_a_resumed_run_removes_the_best_checkpoint_a_killed_attempt_left(tmp_path: Path) -> None:
    """An attempt killed after writing a best but before the last.ckpt that records it leaves a best that the
    resumed run's ranking does not know (saved again as `-v1`, or beside a later best)."""
    run = tmp_path / "run"
    fit(run, "++trainer.max_epochs=2")
    (kept,) = best_checkpoints(run)
    # (a name the kept best does not have, as the killed attempt's best had another step)
    stray = next(n for n in ("best-epoch001-step000016.ckpt", "best-epoch000-step000008.ckpt") if n != kept)
    shutil.copy(run / "checkpoints" / kept, run / "checkpoints" / stray)
    fit(run, "++trainer.max_epochs=3")
    assert best_checkpoints(run) == [best_file_of(run)]


def test_a_run_dir_resumes_only_with_its_own_config_unless_forced(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit(run, "++trainer.max_epochs=1")
    fit(run, "++trainer.max_epochs=1")  # the same config: resumed (a finished run: nothing more to train)
    assert last_checkpoint(run)["global_step"] == 8
    # What a researcher changes to continue a run: longer, other loggers, more to read, other loader workers.
    fit(run, "++trainer.max_epochs=2", "logger=csv", "verbose=true", "data.num_workers=1")
    assert last_checkpoint(run)["global_step"] == 16
    saved = (run / "config.yaml").read_text()
    with pytest.raises(UserError, match=r"\(model\.generator\.width differs from its config\.yaml\)"):
        fit(run, "++trainer.max_epochs=3", "model.generator.width=16")
    with pytest.raises(UserError, match=r"\(task\.lr differs.*resume=force"):
        fit(run, "++trainer.max_epochs=3", "task.lr=1e-3")
    assert (run / "config.yaml").read_text() == saved and last_checkpoint(run)["global_step"] == 16
    fit(run, "++trainer.max_epochs=3", "task.lr=1e-3", "resume=force")
    assert last_checkpoint(run)["global_step"] == 24  # continued, not started afresh
    fit(run, "++trainer.max_epochs=4", "task.lr=1e-3")  # the forced config is the run's config now
    assert last_checkpoint(run)["global_step"] == 32


def test_the_refusal_names_a_few_keys_then_counts_the_rest(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    saved = {"seed": 1, "task": {"lr": 1e-3, "beta1": 0.5}, "model": {"width": 8, "depth": 2, "act": "elu"}}
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    changed = {
        "seed": 2,
        "task": {"lr": 0.01, "beta1": 0.9},
        "model": {"width": 16, "depth": 3, "act": "elu"},
    }
    with pytest.raises(UserError) as refused:
        refuse_changed_config(tmp_path, "auto", None, {**changed, "trainer": {"max_epochs": 9}})
    assert "(model.depth, model.width, seed, task.beta1 and 1 more differ" in str(refused.value)
    refuse_changed_config(tmp_path, "auto", None, {**saved, "trainer": {"max_epochs": 9}})  # resume-safe
    refuse_changed_config(tmp_path, "force", None, changed)
    refuse_changed_config(tmp_path, "auto", str(tmp_path / "other.ckpt"), changed)  # a chosen checkpoint


def test_a_refused_resume_is_one_error_line_before_anything_in_the_run_dir_changes(
    tmp_path: Path, home: Path
) -> None:
    run_dir = tmp_path / "run"
    args = [*TINY_DCGAN, "++trainer.max_epochs=1", f"hydra.run.dir={run_dir}"]  # with W&B, offline
    first = run_cli(*args, home=home)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {
        path: path.read_bytes() for path in run_dir.glob("*") if path.is_file() and path.name != "train.log"
    }
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    refused = run_cli(*args, "model.generator.width=16", home=home)
    assert refused.returncode == 2
    assert_clean_failure(refused, "(model.generator.width differs from its config.yaml)", "resume=force")
    assert "── run" not in refused.stderr  # no summary: no run
    after = {
        path: path.read_bytes() for path in run_dir.glob("*") if path.is_file() and path.name != "train.log"
    }
    assert after == before  # config.yaml, the W&B pointer, metrics.json, summary.txt
    assert sorted((run_dir / "wandb").glob("offline-run-*")) == wandb_runs  # no W&B run started
