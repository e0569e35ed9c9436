"""Skipping optimiser steps whose loss went non-finite, and stopping when that keeps happening."""

from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger(__name__)


class NonFiniteGuard:
    """Checks named loss parts before the backward pass.

    A step with a NaN/inf part is skipped (no backward, no optimiser step) and counted; after
    ``max_consecutive`` such steps in a row training stops with an error naming the step and the
    parts that went bad. Under DDP the decision is all-reduced, so every rank skips together
    (a rank skipping alone would deadlock the gradient all-reduce).
    """

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def check(self, module: L.LightningModule, parts: dict[str, torch.Tensor], step: int) -> bool:
        """True when every part is finite on every rank; else counts, warns, maybe raises, and returns False."""
        # One host read for all parts (each read is a device sync on a GPU).
        finite = torch.stack([torch.isfinite(value.detach()).all() for value in parts.values()]).tolist()
        bad = [name for name, ok in zip(parts, finite, strict=True) if not ok]
        ok = not bad
        trainer = module._trainer
        if trainer is not None and trainer.world_size > 1:
            ok = trainer.strategy.reduce_boolean_decision(ok, all=True)
        if ok:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        where = ", ".join(bad) if bad else "a loss part on another rank"
        log.warning("step %d: non-finite %s; optimiser step skipped (%d in a row, %d in all)", step, where,
                    self.consecutive, self.skipped)
        if self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"training stopped at step {step}: {self.consecutive} steps in a row had a non-finite loss "
                f"(this step: {where}). Lower the learning rate, enable gradient clipping or check the data; "
                "resume from the last checkpoint with ckpt_path=last")
        return False
