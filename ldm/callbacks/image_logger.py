"""Image grids, as uint8, to every active logger and as PNG files in the run folder."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torchvision.utils import make_grid

log = logging.getLogger(__name__)


def to_uint8_grid(images: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """[-1, 1] BCHW -> HWC uint8 grid (loggers render float images black, so always uint8)."""
    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, normalize=False, padding=2,
                     pad_value=1.0)
    return ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def run_dir(trainer: L.Trainer) -> Path:
    """The folder this run writes into (the trainer's root, i.e. the Hydra run folder)."""
    return Path(trainer.default_root_dir)


@rank_zero_only
def log_grid(trainer: L.Trainer, key: str, grid: np.ndarray) -> Path:
    """Send one uint8 HWC grid to TensorBoard/W&B loggers and save it as PNG; returns the PNG path."""
    step = trainer.global_step
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[grid], step=step)
    path = run_dir(trainer) / "images" / f"{key.replace('/', '_')}_step{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


class ImageLogger(L.Callback):
    """After the first validation batch of an epoch, log the module's ``log_images(batch)`` grids."""

    def __init__(self, max_images: int = 8, every_n_epochs: int = 1):
        self.max_images = max_images
        self.every_n_epochs = every_n_epochs

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or trainer.sanity_checking or not hasattr(pl_module, "log_images"):
            return
        if trainer.current_epoch % self.every_n_epochs:
            return
        images = pl_module.log_images(batch, max_images=self.max_images)
        for name, tensor in images.items():
            log_grid(trainer, f"val/{name}", to_uint8_grid(tensor))
