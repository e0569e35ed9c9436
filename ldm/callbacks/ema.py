"""EMA of the trainable weights with warm-up, on top of Lightning's ``WeightAveraging``.

Lightning swaps the averaged weights in for validation, stores them as the checkpoint's
``state_dict`` (the raw weights go to ``current_model_state``) and restores both on resume.
"""

from __future__ import annotations

from functools import partial

import torch
from lightning.pytorch.callbacks import WeightAveraging


def ema_update(decay: float, warmup: bool, averaged: torch.Tensor, current: torch.Tensor,
               num_averaged: torch.Tensor) -> torch.Tensor:
    """averaged <- d averaged + (1 - d) current, d = min(decay, (1 + n)/(10 + n)) with warm-up.

    The warm-up (as in CompVis' LitEma) lets early averages follow the fast-moving weights
    instead of being dominated by the random initialisation.
    """
    n = float(num_averaged)
    d = min(decay, (1.0 + n) / (10.0 + n)) if warmup else decay
    return averaged * d + current * (1.0 - d)


class EMA(WeightAveraging):
    """Exponential moving average of every parameter and buffer of the module, updated each step."""

    def __init__(self, decay: float = 0.9999, warmup: bool = True, update_every_n_steps: int = 1,
                 device: str | None = None):
        super().__init__(device=device, use_buffers=True, avg_fn=partial(ema_update, decay, warmup))
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0

    def on_train_end(self, trainer, pl_module) -> None:
        """Keep the raw weights in the module when training ends.

        Lightning's default copies the average into the module here, but ModelCheckpoint may write
        ``last.ckpt`` afterwards, which would then hold the EMA weights as the "current" ones and a
        resume would continue from the average. Exports read :meth:`averaged_module` instead.
        """

    def averaged_module(self) -> torch.nn.Module | None:
        """The module holding the averaged weights (None before fit starts)."""
        return None if self._average_model is None else self._average_model.module
