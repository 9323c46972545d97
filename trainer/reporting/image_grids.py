"""Image grids for logging: built with plain torch (torchvision is optional), saved as PNG, sent to
loggers."""

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from trainer.lightning_internals import log_step


def make_grid(images: torch.Tensor, columns: int = 8, padding: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one (H', W', C) uint8 image, `columns` images per row."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    grid = torch.full((c, rows * (h + padding) + padding, columns * (w + padding) + padding), -1.0)
    for i, image in enumerate(images.float().cpu().clamp(-1, 1)):
        top, left = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        grid[:, top : top + h, left : left + w] = image
    return ((grid + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def log_image_grid(trainer: L.Trainer, key: str, images: torch.Tensor) -> Path:
    """Saves the grid under <run dir>/samples/ and sends it to every logger that takes images."""
    grid = make_grid(images)
    path = (
        Path(trainer.default_root_dir)
        / "samples"
        / f"{key.replace('/', '_')}_epoch{trainer.current_epoch:03d}.png"
    )
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(path)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key, [grid], step=log_step(trainer))
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, log_step(trainer), dataformats="HWC")
    return path
