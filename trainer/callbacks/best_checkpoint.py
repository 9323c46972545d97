"""<run dir>/checkpoints/best-*.ckpt: the checkpoint with the best `monitor.metric` so far.

Lightning's ModelCheckpoint, plus a check at the first validation that the metric exists at all, so a
misspelt `monitor.metric` ends the run with one line that lists the metrics the task does log; and a NaN
or infinite value is never "best" (Lightning keeps the first checkpoint whatever its score, so a run that
diverged before its first validation would call its broken weights the best).
"""

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from trainer.errors import UserError


class BestCheckpoint(ModelCheckpoint):
    def __init__(self, run_dir: Path, metric: str, mode: str):
        if mode not in ("min", "max"):
            raise UserError(f"monitor.mode={mode} is not an option: use min or max")
        super().__init__(
            dirpath=run_dir / "checkpoints",
            filename="best-epoch{epoch:03d}-step{step:06d}",
            auto_insert_metric_name=False,
            monitor=metric,
            mode=mode,
            save_top_k=1,
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self.monitor not in trainer.callback_metrics:
            logged = sorted(trainer.callback_metrics)
            raise UserError(
                f"monitor.metric={self.monitor} is never logged by the task (it logs {logged}): "
                "set monitor.metric to one of those"
            )
        super().on_validation_end(trainer, pl_module)

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is not None and not torch.isfinite(current):
            return False
        return super().check_monitor_top_k(trainer, current)
