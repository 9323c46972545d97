"""<run dir>/config.yaml: the resolved config of the run, which a later command in the same run dir is
compared with before it resumes (trainer/config/resume.py) and which divergence bundles carry.

Written when training is about to start, its data found and its model built: a command that fails before
(a missing data folder) leaves the earlier run's config as it was. Atomic: the other ranks of a job may read
it while rank zero writes it.
"""

from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import OmegaConf

from trainer.config.resume import CONFIG_FILE
from trainer.files import write_text_atomic


class ConfigFile(L.Callback):
    def __init__(self, run_dir: Path, resolved: dict[str, Any]):
        self.path, self.text = Path(run_dir) / CONFIG_FILE, OmegaConf.to_yaml(resolved)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, self.text)
