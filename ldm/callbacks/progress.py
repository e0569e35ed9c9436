"""A progress bar that advances every batch but reads its metrics back from the device only on logging steps."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

from ldm.stages.guard import is_logging_step


class ProgressBar(RichProgressBar):
    """Lightning's rich bar; its metrics (``prog_bar=True`` values) are refreshed on logging steps only.

    Reading a logged value converts it to a Python number, which waits for the device: done for every
    batch, as Lightning's bars do, that keeps the host from running ahead of a GPU. The count, speed and
    time advance every batch as before; the losses shown are those of the latest logging step.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._shown: dict[str, Any] = {}

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if trainer.training and not is_logging_step(trainer) and self._shown:
            return self._shown
        self._shown = super().get_metrics(trainer, pl_module)
        return self._shown
