"""Runs the job in this process (Lightning starts any extra DDP processes itself)."""

from typing import Any

from omegaconf import DictConfig

from trainer.run import train


class LocalLauncher:
    def launch(self, cfg: DictConfig) -> dict[str, Any]:
        return train(cfg)
