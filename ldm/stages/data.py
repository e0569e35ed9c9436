"""The Lightning DataModule over webdataset shards: Lightning glue around ``ldm.data.loaders.ShardData``."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from ldm.data.loaders import ShardData
from ldm.utils.checks import require_int


class WebDataModule(L.LightningDataModule):
    """Batches ``{image|latent, caption, class_label, key}`` from shards; arguments as :class:`ShardData`.

    ``prepare`` runs in ``prepare_data`` (once per node); loaders are split over ``trainer.world_size``.
    """

    def __init__(self, overfit_batches: int = 0, **kwargs: Any):
        super().__init__()
        require_int("data.overfit_batches", overfit_batches, 0)
        self.overfit_batches = overfit_batches
        self.data = ShardData(**kwargs)

    @property
    def batch_size(self) -> int:
        """The per-device training batch."""
        return self.data.batch_size

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.data.check_source()

    def prepare_data(self) -> None:
        # Preparing (on first use only) must not move the run's random streams: a run that builds the data and
        # one that finds it built draw the same noise, timesteps and dropout from the same seed.
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            self.data.prepare()
        random.setstate(py_state)
        np.random.set_state(np_state)

    def _world(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def train_dataloader(self) -> DataLoader | Iterable[dict]:
        loader = self.data.train_dataloader(self._world())
        if self.overfit_batches:
            return ReplayBatches(loader, self.overfit_batches, self.data.batches_per_epoch(self._world()))
        trainer = self.trainer
        if trainer is not None and trainer.fit_loop.restarting:
            # A resumed run (its loops already restored): continue the stream after the batches already trained
            # on (processed: a checkpoint written at a batch's end counts that batch as processed, not yet
            # completed). A checkpoint written once an epoch's last batch completed, with validation on, makes
            # Lightning first finish that epoch (its validation) with an iteration it does not consume, which the
            # stream must not count as a data epoch. (Lightning's own epoch number may run one ahead.)
            per_epoch = self.data.batches_per_epoch(self._world())
            progress = trainer.fit_loop.epoch_loop.batch_progress
            epoch, done = divmod(progress.total.processed, per_epoch)
            empty_first = progress.current.completed >= per_epoch and trainer.enable_validation
            self.data.set_position(epoch - 1 if empty_first else epoch, done)
        return loader

    def val_dataloader(self) -> DataLoader | list:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return self.data.val_dataloader(self._world(), rank)

    def skipped(self) -> dict[str, int]:
        """Counts of valid and skipped samples so far (see ``ShardData.skipped``)."""
        return self.data.skipped()


class ReplayBatches:
    """The first ``n`` batches of ``loader``, replayed ``per_epoch`` batches every epoch (``data.overfit_batches``:
    a model that cannot drive the loss of a few fixed batches towards zero has a bug)."""

    def __init__(self, loader: Iterable[dict], n: int, per_epoch: int):
        self.loader, self.n, self.per_epoch = loader, n, per_epoch
        self.batches: list[dict] = []

    def __len__(self) -> int:
        return self.per_epoch

    def __iter__(self) -> Iterator[dict]:
        if not self.batches:
            self.batches = list(itertools.islice(iter(self.loader), self.n))
        for i in range(self.per_epoch):
            yield self.batches[i % len(self.batches)]
