"""The learning-rate schedule of both stages: warm-up, then constant, cosine or linear decay to the budget's end.

Runs here are often bounded by ``trainer.max_time`` rather than a step count, so a scheduler that must know
its length in advance cannot be used. This callback measures progress against whichever budget the trainer
has (steps, epochs or wall time) and sets every optimiser's learning rate each batch:

    lr = base_lr x warmup(batches) x decay(progress)

- warm-up: linear from 1/warmup_steps to 1 over the first ``warmup_steps`` batches;
- ``decay="linear"``: 1 until the last ``decay_fraction`` of the budget, then linear to ``final_factor`` (the
  "stable then decay" shape of WSD schedules, Hu et al. 2024, MiniCPM, sec. 4);
- ``decay="cosine"``: half a cosine from 1 to ``final_factor`` over the last ``decay_fraction`` (1.0: the whole
  run, Loshchilov & Hutter 2017);
- ``decay="constant"``: 1.

``base_lr`` is the optimiser's configured learning rate, times the global batch when ``scale_lr`` is set
(CompVis main.py's rule: per-device batch x devices x nodes x gradient accumulation). It is kept in the
optimiser's state, so a resumed run continues the same schedule. The learning rate is logged as ``train/lr``.
"""

from __future__ import annotations

import logging
import math

import lightning as L
from lightning.pytorch.callbacks import Callback, Timer

log = logging.getLogger(__name__)
DECAYS = ("constant", "linear", "cosine")


def lr_factor(batches: int, progress: float, warmup_steps: int, decay: str, decay_fraction: float,
              final_factor: float) -> float:
    """The schedule's multiplier after ``batches`` batches at ``progress`` in [0, 1] of the budget."""
    warm = min(1.0, (batches + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if decay == "constant" or decay_fraction <= 0 or progress <= 1.0 - decay_fraction:
        return warm
    done = min(1.0, (progress - (1.0 - decay_fraction)) / decay_fraction)
    shape = done if decay == "linear" else 0.5 * (1 - math.cos(math.pi * done))
    return warm * (1.0 + (final_factor - 1.0) * shape)


class LRSchedule(Callback):
    """Warm-up then decay over the training budget (see the module docstring).

    Progress is the largest of ``global_step / max_steps``, the epoch fraction of ``max_epochs``
    and the elapsed share of ``max_time``. Wall time differs between ranks, so under DDP the
    time-based progress is taken from rank 0 (broadcast every ``sync_every`` batches) and every
    rank applies the same learning rate.
    """

    def __init__(self, warmup_steps: int = 0, decay: str = "linear", decay_fraction: float = 0.2,
                 final_factor: float = 0.0, scale_lr: bool = False, sync_every: int = 20):
        if decay not in DECAYS:
            raise ValueError(f"callbacks.lr_schedule.decay={decay!r}: expected one of {DECAYS}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"callbacks.lr_schedule.warmup_steps={warmup_steps!r}: expected an integer >= 0")
        if not 0.0 <= decay_fraction <= 1.0:
            raise ValueError(f"callbacks.lr_schedule.decay_fraction={decay_fraction}: expected a value in [0, 1]")
        if not 0.0 <= final_factor <= 1.0:
            raise ValueError(f"callbacks.lr_schedule.final_factor={final_factor}: expected a value in [0, 1]")
        self.warmup_steps, self.decay, self.decay_fraction = warmup_steps, decay, decay_fraction
        self.final_factor, self.scale_lr = final_factor, scale_lr
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

    def global_batch(self, trainer: L.Trainer) -> int:
        batch_size = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        if batch_size is None:
            raise ValueError("callbacks.lr_schedule.scale_lr=true needs a datamodule with a batch_size")
        return batch_size * trainer.num_devices * trainer.num_nodes * trainer.accumulate_grad_batches

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        has_budget = (trainer.max_steps and trainer.max_steps > 0) or (trainer.max_epochs and trainer.max_epochs > 0) \
            or self._timer(trainer) is not None
        if self.decay != "constant" and not has_budget:
            log.info("lr_schedule: the run has no max_steps, max_epochs or max_time; the learning rate does not decay")
        has_batch = trainer.datamodule is not None and getattr(trainer.datamodule, "batch_size", None) is not None
        global_batch = self.global_batch(trainer) if self.scale_lr or has_batch else None
        scale = global_batch if self.scale_lr else 1
        for k, optimizer in enumerate(trainer.optimizers):
            for group in optimizer.param_groups:
                if "base_lr" not in group:  # a resumed run keeps the base from its checkpointed optimiser state
                    group["base_lr"] = group["lr"] * scale
                    if scale != 1:
                        log.info("scale_lr: optimiser %d lr = %.3g x %d = %.3g", k, group["lr"], scale,
                                 group["base_lr"])
                elif global_batch is not None and group.get("global_batch", global_batch) != global_batch:
                    self._rescale(k, group, group["global_batch"], global_batch)
                group["global_batch"] = global_batch

    def _rescale(self, k: int, group: dict, old: int, new: int) -> None:
        """A run resumed at another global batch (world size, accumulation): the rule ``scale_lr`` names."""
        if self.scale_lr:
            before, group["base_lr"] = group["base_lr"], group["base_lr"] * new / old
            log.info("global batch %d -> %d: optimiser %d base lr %.3g -> %.3g (scale_lr: lr x global batch)", old,
                     new, k, before, group["base_lr"])
        else:
            log.info("global batch %d -> %d: optimiser %d base lr %.3g as configured (scale_lr=false)", old, new, k,
                     group["base_lr"])

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        timer = self._timer(trainer)
        if timer is not None and batch_idx % self.sync_every == 0:
            elapsed, remaining = timer.time_elapsed("train"), timer.time_remaining("train")
            share = elapsed / (elapsed + remaining) if remaining is not None and elapsed + remaining > 0 else 0.0
            self._time_progress = float(trainer.strategy.broadcast(share, src=0))
        # Every optimiser steps once per batch (the autoencoder stage has two): batches = steps / optimisers.
        batches = trainer.global_step // max(1, len(trainer.optimizers))
        self.factor = lr_factor(batches, self.progress(trainer, batch_idx), self.warmup_steps, self.decay,
                                self.decay_fraction, self.final_factor)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * self.factor
        pl_module.log("train/lr", trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False,
                      batch_size=1)
