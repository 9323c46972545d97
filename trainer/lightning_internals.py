"""The Lightning internals this project reads or changes, all here: each is private to Lightning (2.6), so an
upgrade of the `lightning` pin in pyproject.toml is checked against this one module. The tests that cover
each: logging steps (tests/test_cli.py reads the logged values back from W&B), stops and validations at a
stop (tests/test_kill_resume.py, tests/test_resume.py), loader states (tests/test_resume.py)."""

from typing import Any

import lightning as L


def log_step(trainer: L.Trainer) -> int:
    """The step Lightning logs metrics at: batches that stepped, so a GAN's two optimizers count once."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def is_logging_step(trainer: L.Trainer) -> bool:
    """True on the steps whose logged values Lightning writes out (every `trainer.log_every_n_steps`).

    `self.log` costs roughly 0.4 ms per call on CPU; logging per-step values only on these steps keeps the
    loop within about 1% of a hand-written one (scripts/bench_overhead.py).
    """
    return trainer._logger_connector.should_update_logs


def can_stop_early(trainer: L.Trainer) -> bool:
    """Whether Lightning would honour `trainer.should_stop` now (it waits for `min_epochs`/`min_steps`)."""
    return trainer.fit_loop._can_stop_early


def validation_due(trainer: L.Trainer) -> bool:
    """Whether Lightning's own rule runs a validation at the end of the current batch."""
    fetcher = trainer.fit_loop._data_fetcher
    return fetcher is not None and trainer.fit_loop.epoch_loop._should_check_val_fx(fetcher)


def training_loaders(trainer: L.Trainer) -> list[Any]:
    """The training loaders, with the checkpoint's loader states loaded into them (a no-op when Lightning has
    loaded them or when not resuming)."""
    fit_loop = trainer.fit_loop
    fit_loop._load_combined_loader_states()
    return fit_loop._combined_loader.flattened if fit_loop._combined_loader else []


def close_finished_epoch(checkpoint: dict[str, Any]) -> None:
    """Records a checkpoint written in `on_train_epoch_end` as the epoch boundary it is.

    Lightning (2.6) writes it as "epoch processed, not completed", with the epoch's batch counters full.
    Resumed with `max_steps` set and validation within the epoch (`val_check_interval` < 1, as `+exp=qa`),
    Lightning restarts that finished epoch's loop, and the next epoch trains one batch or none. Here the
    epoch is completed and the per-epoch counters are zero, as at the start of the next epoch, so every
    resume starts that epoch afresh. (Epoch-interval LR schedulers step after this hook; Lightning's own
    resume from such a checkpoint skips that step too.)"""
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop:
        return
    epochs = loop["epoch_progress"]
    epoch = epochs["current"]
    if not epoch["processed"] == epoch["started"] == epoch["completed"] + 1:
        return  # written inside an epoch (mid-epoch save, validation) or after training ended
    for part in ("total", "current"):
        epochs[part]["completed"] = epochs[part]["processed"]
    batches, validations = loop["epoch_loop.batch_progress"], loop["epoch_loop.val_loop.batch_progress"]
    for counters in (batches["current"], validations["current"], validations["total"]):
        counters.update(dict.fromkeys(counters, 0))
    batches["is_last_batch"] = validations["is_last_batch"] = False
