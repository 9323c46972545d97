"""Lightning's rich progress bar, counting what the task counts.

A task whose run is not a number of epochs (RL: a budget of environment steps, over as many epochs as it
takes) reports `progress()`; the bar then shows `env steps 12,288/150,000` across the whole run instead of
"Epoch 14/-2" restarting every epoch.
"""

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

from trainer.tasks.base import Task


class ProgressBar(RichProgressBar):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        progress = _progress(pl_module)
        if progress is None or self.train_progress_bar_id is None or self.progress is None:
            super().on_train_epoch_start(trainer, pl_module)
        if progress is not None:
            self._show(*progress)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if (progress := _progress(pl_module)) is not None:
            self._show(*progress)

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs == -1:  # an open-ended run has no last epoch to show
            return f"Epoch {current_epoch}"
        return super()._get_train_description(current_epoch)

    def _show(self, done: int, total: int, unit: str) -> None:
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(
                self.train_progress_bar_id, completed=min(done, total), total=total, description=unit
            )
            self.refresh()


def _progress(pl_module: L.LightningModule) -> tuple[int, int, str] | None:
    return pl_module.progress() if isinstance(pl_module, Task) else None
