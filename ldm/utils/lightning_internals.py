"""The Lightning internals the framework relies on, in one place: each has no public equivalent, and each is
pinned by ``tests/test_internals.py``, which fails loudly when an upgrade changes it. Everything else goes through
Lightning's public interface. (One more is an override rather than a call: ``ldm.callbacks.progress.ProgressBar``
replaces RichProgressBar's ``_get_train_description``; the same test pins that hook.)"""

from __future__ import annotations

from typing import Any

import lightning as L


def batches_that_stepped(trainer: L.Trainer) -> int:
    """Batches of this fit whose optimiser step has run: the count Lightning's logging cadence
    (``log_every_n_steps``) is taken against."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def uncount_optimizer_steps(trainer: L.Trainer, steps: int) -> None:
    """Take ``steps`` optimiser steps back out of ``trainer.global_step`` (and so out of ``max_steps``)."""
    loop = trainer.fit_loop.epoch_loop
    if trainer.lightning_module.automatic_optimization:
        total = loop.automatic_optimization.optim_progress.optimizer.step.total
    else:
        total = loop.manual_optimization.optim_step_progress.total
    total.ready -= steps
    total.completed -= steps


def wandb_run_started(logger: Any) -> bool:
    """Whether a ``WandbLogger`` has created its run (its public ``experiment`` would create one)."""
    return logger._experiment is not None
