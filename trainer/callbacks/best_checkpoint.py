"""<run dir>/checkpoints/best-*.ckpt: the checkpoint with the best `monitor.metric` so far.

Lightning's ModelCheckpoint, plus a check at the first validation that the metric exists at all, so a
misspelt `monitor.metric` ends the run with one line that lists the metrics the task does log; and a NaN
or infinite value is never "best" (Lightning keeps the first checkpoint whatever its score, so a run that
diverged before its first validation would call its broken weights the best).

The folder holds the ranked checkpoints and nothing else, across resumes too. Lightning removes only the
file its restored ranking names, so others stayed: the one an attempt wrote before it was killed and before
the last.ckpt that records it (the resumed run saves the same epoch as `-v1`, or, scoring it otherwise, a
later best beside it); the one a run was resumed from with `ckpt_path` (never removed); and every best of a
run dir that was moved or copied (Lightning drops the ranking when the folder's path changed).
"""

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from trainer.errors import UserError

PREFIX = "best-"


class BestCheckpoint(ModelCheckpoint):
    def __init__(self, run_dir: Path, metric: str, mode: str):
        if mode not in ("min", "max"):
            raise UserError(f"monitor.mode={mode} is not an option: use min or max")
        super().__init__(
            dirpath=run_dir / "checkpoints",
            filename=PREFIX + "epoch{epoch:03d}-step{step:06d}",
            auto_insert_metric_name=False,
            monitor=metric,
            mode=mode,
            save_top_k=1,
        )

    @property
    def folder(self) -> Path:
        """`dirpath`, which this callback always sets (Lightning's may be None until its setup)."""
        assert self.dirpath is not None
        return Path(self.dirpath)

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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = self._in_this_folder(state_dict)
        super().load_state_dict(state_dict)
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            # The newest best's score (loggers upload it with that checkpoint), which Lightning 2.6 does not
            # restore: a resumed run would hold none until its next best, an uninterrupted one this.
            self.current_score = state_dict.get("current_score")

    def _in_this_folder(self, state: dict[str, Any]) -> dict[str, Any]:
        """The state of a run dir that has moved since it was saved (its best checkpoint is here under its
        own name), with its paths moved here too."""
        old, best = state.get("dirpath"), state.get("best_model_path") or ""
        if old in (None, self.dirpath) or not best or not (self.folder / Path(best).name).is_file():
            return state

        def moved(path: str) -> str:
            here = path and Path(path).parent == Path(old)
            return str(self.folder / Path(path).name) if here else path

        return {
            **state,
            "dirpath": self.dirpath,
            "best_model_path": moved(best),
            "kth_best_model_path": moved(state.get("kth_best_model_path") or ""),
            "last_model_path": moved(state.get("last_model_path") or ""),
            "best_k_models": {moved(path): score for path, score in state.get("best_k_models", {}).items()},
        }

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path and self.best_k_models:  # a resumed ranking: the folder is made to match it
            self._remove_unranked(trainer, keep=trainer.ckpt_path)

    def _update_best_and_save(
        self, current: torch.Tensor, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]
    ) -> None:
        # (Lightning's one place that writes a new best, after a validation or at an epoch's end)
        super()._update_best_and_save(current, trainer, monitor_candidates)
        self._remove_unranked(trainer)

    def _remove_unranked(self, trainer: L.Trainer, keep: str | Path | None = None) -> None:
        """Removes the best checkpoints of the folder that the ranking does not hold (and are not `keep`: the
        checkpoint being resumed from stays until a new best replaces it)."""
        ranked = {Path(path).resolve() for path in [*self.best_k_models, *([keep] if keep else [])]}
        for path in self.folder.glob(f"{PREFIX}*.ckpt"):
            if path.resolve() not in ranked:
                trainer.strategy.remove_checkpoint(path)
