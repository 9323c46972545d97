"""<run dir>/checkpoints/last.ckpt: what auto-resume starts from.

Saved at the end of every epoch (after validation), every `every_n_train_steps` optimizer steps if set
(after the validation that follows that step, if any), and when training stops for any reason other than a
crash. Lightning's own `save_last` skips the epochs
in which the monitored metric did not improve, which would make a resumed run redo them. Writes go
through the trainer's checkpoint IO (atomic, see trainer/checkpoint.py).
"""

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from trainer.checkpoint import close_finished_epoch


class LastCheckpoint(L.Callback):
    # Read by loggers that upload checkpoints (WandbLogger's log_model), as on Lightning's ModelCheckpoint.
    monitor = None
    current_score = None
    best_model_path = ""
    best_model_score = None
    save_top_k = 1

    def __init__(self, dirpath: str, every_n_train_steps: int | None = None):
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
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.global_step == self._saved_at_step:
            return False
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # the full state: optimizers, loops, RNG
        self._saved_at_step = trainer.global_step
        self.last_model_path = str(path)
        for logger in trainer.loggers:
            logger.after_save_checkpoint(self)
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
        # Not on an epoch's last batch: on_train_epoch_end saves next, after the epoch's validation. Lightning
        # resumes a checkpoint written here past the validation that followed it, without running it, and what
        # that validation does would be lost (a DiLoCo sync, a plateau scheduler's step, a best checkpoint).
        due = self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0
        if due and not trainer.is_last_batch:
            self.save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A validation within the epoch, right after this step's save: save again, past it (as above). A run
        # that dies during that validation still resumes from the first save, without it.
        if trainer.state.fn == TrainerFn.FITTING and trainer.global_step == self._saved_at_step:
            self._saved_at_step = -1
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)  # validation, if any, has already run: its metrics go into the checkpoint

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)  # max_steps can end training mid-epoch
