"""Validate the weights a run ends with when it stops on `trainer.max_steps` in the middle of an epoch.

Lightning validates at epoch ends only, so a run cut short by max_steps would end without validation
metrics (nothing in metrics.json, no best checkpoint). Asking the loop to stop at the last step makes
Lightning run its validation there, as it does for early stopping.
"""

from typing import Any

import lightning as L


class FinalValidation(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True
