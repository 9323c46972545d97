"""<run dir>/checkpoints/last.ckpt: what auto-resume starts from.

Saved at the end of every epoch (after validation), every `every_n_train_steps` optimizer steps if set
(after the validation that follows that step, if any), and when training stops for any reason other than a
crash. Lightning's own `save_last` skips the epochs
in which the monitored metric did not improve, which would make a resumed run redo them. Writes go
through the trainer's checkpoint IO (atomic, see trainer/checkpoint.py).

A run that stops within an epoch (`trainer.max_steps`, a preemption, Lightning's `max_time`) is saved at the
end of its last batch: once training has ended, Lightning records the cut-short epoch as finished, and a run
resumed from there (with a larger max_steps) would skip the rest of that epoch. The validation that only the
stop brings (trainer/callbacks/final_validation.py) reports on the last weights but is not saved past: an
uninterrupted run has none there, and the resumed run must go on as that run does.
"""

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn

from trainer.config.ranges import Positive
from trainer.lightning_internals import can_stop_early, close_finished_epoch, validation_due


@runtime_checkable
class SettlesBeforeSave(Protocol):
    """A callback that must act on everything in flight before a checkpoint is written (the divergence
    guard reads its alarms a batch late): a checkpoint then holds only checked states."""

    def settle(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None: ...


class LastCheckpoint(Checkpoint):
    """A `Checkpoint`, so that Lightning runs its hooks after every other callback's (checkpoint callbacks
    go last, in their order): what is saved after a validation holds what the others recorded of it
    (metrics.json's values, the best checkpoint's choice; trainer/run.py puts that one first)."""

    # Read by loggers that upload checkpoints (WandbLogger's log_model), as on Lightning's ModelCheckpoint.
    monitor = None
    current_score = None
    best_model_path = ""
    best_model_score = None
    save_top_k = 1

    def __init__(self, dirpath: str, every_n_train_steps: Positive | None = None):
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(
                f"every_n_train_steps must be a positive number or null, got {every_n_train_steps}"
            )
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self.last_model_path = ""
        self.best_k_models: dict[str, Any] = {}  # (read by loggers too; always empty: nothing is ranked here)
        self._saved_at_step = -1

    def save(self, trainer: L.Trainer) -> bool:
        """Writes last.ckpt unless this step is saved already or this is a fast dev run (which, as with
        Lightning's own checkpoints, must not replace a real run's); True if it wrote."""
        # (`fast_dev_run` and `callbacks` are set on the trainer by Lightning's connectors, undeclared)
        fast_dev_run = trainer.fast_dev_run  # pyright: ignore[reportAttributeAccessIssue]
        if trainer.sanity_checking or fast_dev_run or trainer.global_step == self._saved_at_step:
            return False
        callbacks = trainer.callbacks  # pyright: ignore[reportAttributeAccessIssue]
        for callback in callbacks:  # the guard reads the batches it has not read yet, and may roll back or
            if isinstance(callback, SettlesBeforeSave):  # halt first
                callback.settle(trainer, trainer.lightning_module)
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # the full state: optimizers, loops, RNG
        self._saved_at_step = trainer.global_step
        self.last_model_path = str(path)
        for logger in trainer.loggers:  # (they read only the paths and best_k_models, which this has)
            logger.after_save_checkpoint(self)  # pyright: ignore[reportArgumentType]
        return True

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        close_finished_epoch(checkpoint)  # every checkpoint of the run, this one's and the best ones

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        close_finished_epoch(checkpoint)  # one written before this fix (Lightning restores loops later)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # Every N steps, and where training stops. Not on an epoch's last batch: on_train_epoch_end saves
        # next, after the epoch's validation. Lightning resumes a checkpoint written here past the validation
        # that followed it, without running it, and what that validation does would be lost (a DiLoCo sync, a
        # plateau scheduler's step, a best checkpoint).
        due = self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0
        if (due or stops_after_this_batch(trainer)) and not trainer.is_last_batch:
            self.save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A validation due within the epoch, right after this step's save: save again, past it (as above);
        # not one that only a stop brings (see the module's doc). A run that dies during a validation still
        # resumes from the first save, without it.
        if (
            trainer.state.fn == TrainerFn.FITTING
            and trainer.global_step == self._saved_at_step
            and not validates_only_to_stop(trainer)
        ):
            self._saved_at_step = -1
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)  # validation, if any, has already run: its metrics go into the checkpoint

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)  # a stop saved at no batch's end (early stopping at a validation)


def stops_after_this_batch(trainer: L.Trainer) -> bool:
    """`trainer.max_steps` is reached, or a callback (final validation, a preemption, Lightning's `max_time`
    timer) has asked training to stop."""
    return 0 < trainer.max_steps <= trainer.global_step or (trainer.should_stop and can_stop_early(trainer))


def validates_only_to_stop(trainer: L.Trainer) -> bool:
    """Whether the validation under way is one that Lightning runs only because training stops here
    (`trainer.should_stop` within an epoch), not one it was due to run at this batch anyway."""
    if not trainer.should_stop:
        return False
    trainer.should_stop = False  # Lightning's own rule, asked as if the run went on
    try:
        return not validation_due(trainer)
    finally:
        trainer.should_stop = True
