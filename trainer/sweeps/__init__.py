"""Hyperparameter sweeps: Optuna through Hydra multirun (conf/hparams_search), Ray Tune with ASHA."""

from pathlib import Path


def sweep_group(name: str, sweep_dir: str | Path) -> str:
    """The W&B group of a sweep's trials and its summary: the exp's name and the sweep dir's, e.g.
    dcgan-sw1."""
    return f"{name}-{Path(sweep_dir).name}"
