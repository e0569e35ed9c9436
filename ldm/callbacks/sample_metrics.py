"""Shared machinery of the callbacks that judge generated samples while a latent diffusion model trains.

Every ``every_n_steps`` optimiser steps and when fit ends, ``num_samples`` images are generated
with the EMA weights (when the EMA callback is on), the configured sampler and guidance scale,
for conditions (captions / class labels) read from a reference set of real images — so the
generated set follows the data's condition distribution. The reference set comes from the DataModule
(``reference_dataloader``: ``data.reference_shards``, the image shards behind the training data).
Under DDP each rank generates a contiguous share with seeds from the global sample index, updates its metric
state, and the metric's ``compute()`` (run on all ranks) reduces the sums; rank 0 logs. Metric states are sums
of fixed size, updated under ``no_grad`` outside ``training_step``: nothing grows between
evaluations. Callbacks with the same sampling settings at the same step share one set of samples.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import lightning as L
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from ldm.callbacks.ema import averaged_or
from ldm.diffusion.guidance import check_interval, check_rescale
from ldm.evaluation.samples import Conditions, generate, read_reference

log = logging.getLogger(__name__)


def rank_share(n: int, rank: int, world: int) -> range:
    """The contiguous block of global indices ``0..n-1`` that ``rank`` of ``world`` handles."""
    per = math.ceil(n / world)
    return range(min(n, rank * per), min(n, (rank + 1) * per))


class SampleMetricCallback(L.Callback, ABC):
    """Base: generates samples on schedule and hands them to :meth:`evaluate`.

    The reference images (their captions and labels condition the samples, FID compares against them) are the
    DataModule's ``reference_dataloader``.

    Args:
        num_samples: generated images per evaluation (over all ranks).
        num_reference: reference images read (over all ranks); default ``num_samples``.
        every_n_steps: evaluate every so many optimiser steps (0: only when fit ends).
    """

    def __init__(self, num_samples: int = 1000, num_reference: int | None = None,
                 every_n_steps: int = 0, sampler: str = "dpmpp_2m", steps: int = 20, cfg_scale: float = 4.0,
                 seed: int = 0, batch_size: int = 100, resolution: int | None = None,
                 guidance_interval: Sequence[float] | None = None, guidance_rescale: float = 0.0):
        self.num_samples = num_samples
        self.num_reference = num_reference or num_samples
        self.every_n_steps = every_n_steps
        self.sampling = {"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale, "seed": seed,
                         "guidance_interval": check_interval(guidance_interval),
                         "guidance_rescale": check_rescale(guidance_rescale)}
        self.batch_size = batch_size
        self.resolution = resolution
        self._last_step = -1
        self._conditions: Conditions | None = None

    # ----- hooks -------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self._run(trainer, pl_module)

    # ----- for subclasses ----------------------------------------------------------------------
    def reference_fid(self) -> FrechetInceptionDistance | None:
        """The FID metric whose real statistics the reference images feed (None: conditions only)."""
        return None

    @abstractmethod
    def evaluate(self, images: torch.Tensor, conditions: Conditions) -> dict[str, float]:
        """This rank's samples in [0, 1] and their conditions -> metrics (all ranks must call compute)."""

    def describe(self) -> str:
        """What produced the numbers (which feature extractor or model), for the log."""
        return type(self).__name__

    # ----- machinery ---------------------------------------------------------------------------
    def reference_loader(self, trainer: L.Trainer, resolution: int):
        """This rank's share of the reference images, from the DataModule."""
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "reference_dataloader"):
            raise ValueError(f"{type(self).__name__} needs a DataModule with reference_dataloader (the framework's "
                             "WebDataModule, data.reference_shards)")
        return datamodule.reference_dataloader(resolution, self.batch_size, self.num_reference)

    def _samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[torch.Tensor, Conditions]:
        share = rank_share(self.num_samples, trainer.global_rank, trainer.world_size)
        conditions = self._conditions.take(range(len(share)))
        key = (trainer.global_step, self.num_samples, tuple(sorted(self.sampling.items())))
        cache = pl_module.__dict__.setdefault("_sample_metric_cache", {})
        if key not in cache:
            module = averaged_or(trainer, pl_module)
            was_training = module.training
            module.eval()
            with trainer.precision_plugin.forward_context():
                images = generate(module.pipeline(), conditions, **(self.sampling | {"seed": self.sampling["seed"]
                                                                                     + share.start}),
                                  batch_size=self.batch_size)
            module.train(was_training)
            cache.clear()
            cache[key] = images
        return cache[key], conditions

    @torch.no_grad()
    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        if self._conditions is None:
            resolution = self.resolution or pl_module.first_stage.resolution
            limit = len(rank_share(self.num_reference, trainer.global_rank, trainer.world_size))
            self._conditions = read_reference(self.reference_loader(trainer, resolution), max(1, limit),
                                              self.reference_fid())
        images, conditions = self._samples(trainer, pl_module)
        metrics = self.evaluate(images, conditions)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            log.info("step %d: %s — %s, %d samples (%s, %d steps, cfg %.1f)", trainer.global_step,
                     ", ".join(f"{k} = {v:.3f}" for k, v in metrics.items()), self.describe(), self.num_samples,
                     self.sampling["sampler"], self.sampling["steps"], self.sampling["cfg_scale"])
