"""Anneal the learning rate over the last part of a run's budget (steps, epochs or wall time).

Runs here are often bounded by ``trainer.max_time`` rather than a step count, so a step-based
schedule cannot know where the end is. This callback measures progress against whichever budget
the trainer has and decays every optimiser's learning rate linearly to ``final_factor`` over the
last ``fraction`` of it — the "stable then decay" shape of WSD schedules (Hu et al. 2024,
MiniCPM, §4), which recovers most of a full cosine schedule's gain without fixing the length in
advance. It multiplies whatever a configured LR scheduler (e.g. a warm-up) computes.
"""

from __future__ import annotations

import logging
import math

import lightning as L
from lightning.pytorch.callbacks import Callback, Timer

log = logging.getLogger(__name__)


def anneal_factor(progress: float, fraction: float, final_factor: float) -> float:
    """1 until ``1 - fraction`` of the budget, then linear down to ``final_factor`` at the end."""
    if fraction <= 0 or progress <= 1.0 - fraction:
        return 1.0
    done = min(1.0, (progress - (1.0 - fraction)) / fraction)
    return 1.0 + (final_factor - 1.0) * done


class LRAnneal(Callback):
    """Linear learning-rate decay over the final ``fraction`` of the training budget.

    Progress is the largest of ``global_step / max_steps``, the epoch fraction of ``max_epochs``
    and the elapsed share of ``max_time``. Wall time differs between ranks, so under DDP the
    time-based progress is taken from rank 0 (broadcast every ``sync_every`` batches) and every
    rank applies the same learning rate.
    """

    def __init__(self, fraction: float = 0.2, final_factor: float = 0.0, sync_every: int = 20):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"LRAnneal: fraction must be in [0, 1], got {fraction}")
        if not 0.0 <= final_factor <= 1.0:
            raise ValueError(f"LRAnneal: final_factor must be in [0, 1], got {final_factor}")
        self.fraction = fraction
        self.final_factor = final_factor
        self.sync_every = max(1, sync_every)
        self.factor = 1.0
        self._time_progress = 0.0

    @staticmethod
    def _timer(trainer: L.Trainer) -> Timer | None:
        return next((c for c in trainer.callbacks if isinstance(c, Timer)), None)

    def progress(self, trainer: L.Trainer, batch_idx: int) -> float:
        """Share of the budget used so far, in [0, 1] (0 when the run has no budget)."""
        shares = [0.0]
        if trainer.max_steps and trainer.max_steps > 0:
            shares.append(trainer.global_step / trainer.max_steps)
        batches = trainer.num_training_batches
        if trainer.max_epochs and trainer.max_epochs > 0 and math.isfinite(batches) and batches > 0:
            shares.append((trainer.current_epoch + batch_idx / batches) / trainer.max_epochs)
        shares.append(self._time_progress)
        return min(1.0, max(shares))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        has_budget = (trainer.max_steps and trainer.max_steps > 0) or (trainer.max_epochs and trainer.max_epochs > 0) \
            or self._timer(trainer) is not None
        if not has_budget:
            log.info("LRAnneal: the run has no max_steps, max_epochs or max_time; the learning rate is not annealed")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        timer = self._timer(trainer)
        if timer is not None and batch_idx % self.sync_every == 0:
            elapsed, remaining = timer.time_elapsed("train"), timer.time_remaining("train")
            share = elapsed / (elapsed + remaining) if remaining is not None and elapsed + remaining > 0 else 0.0
            self._time_progress = float(trainer.strategy.broadcast(share, src=0))
        self.factor = anneal_factor(self.progress(trainer, batch_idx), self.fraction, self.final_factor)
        schedulers = {id(cfg.scheduler.optimizer): cfg.scheduler for cfg in trainer.lr_scheduler_configs}
        for optimizer in trainer.optimizers:
            scheduler = schedulers.get(id(optimizer))
            for i, group in enumerate(optimizer.param_groups):
                # A scheduler's own value is the base; without one, the group's starting lr (kept in
                # the optimiser state, so a resumed run anneals from the same base).
                base = scheduler.get_last_lr()[i] if scheduler is not None else group.setdefault("anneal_base_lr",
                                                                                                  group["lr"])
                group["lr"] = base * self.factor
        pl_module.log("train/lr_factor", self.factor, on_step=True, on_epoch=False, batch_size=1)
