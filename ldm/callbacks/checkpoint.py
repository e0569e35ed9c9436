"""Periodic checkpoints whose ``last.ckpt`` also holds the state a run ends with.

Lightning's ``ModelCheckpoint`` with ``every_n_train_steps`` writes ``last.ckpt`` on those steps only: a run that
ends between two of them (``trainer.max_steps``, ``trainer.max_time``, ``trainer.max_epochs``) leaves
``last.ckpt`` at the previous periodic step, and continuing it (``ckpt_path=last`` with a larger budget, or a
requeued job) repeats the steps after it. Here the end of a run that finishes normally writes ``last.ckpt`` too,
at the end of its last epoch: before the export callbacks run, so an export that fails leaves the final state to
export again from. A stop by signal writes it in ``ldm.callbacks.preemption``; a run that fails writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


def run_ends_after_this_epoch(trainer: L.Trainer) -> bool:
    """Whether the fit ends once the current training epoch ends (budget reached or a stop requested)."""
    steps_done = trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step
    epochs_done = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
    return bool(trainer.should_stop or steps_done or epochs_done)


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (same arguments), plus ``last.ckpt`` at the step a run ends on."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._step_written = -1

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        self._step_written = trainer.global_step  # any checkpoint of this step (every rank sees the hook)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if (self.save_last and self.dirpath and trainer.global_step > 0
                and trainer.global_step != self._step_written and run_ends_after_this_epoch(trainer)):
            path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            trainer.save_checkpoint(path)
            self.last_model_path = str(path)
