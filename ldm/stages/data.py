"""The Lightning DataModule over webdataset shards: Lightning glue around ``ldm.data.loaders.ShardData``."""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from ldm.data.loaders import ShardData
from ldm.utils.checks import require_int

log = logging.getLogger(__name__)


class WebDataModule(L.LightningDataModule):
    """Batches ``{image|latent, caption, class_label, key}`` from shards; arguments as :class:`ShardData`.

    ``prepare`` runs in ``prepare_data`` (once, on global rank 0); loaders are split over ``trainer.world_size``.
    """

    def __init__(self, overfit_batches: int = 0, reference_shards: str | None = None, **kwargs: Any):
        super().__init__()
        require_int("data.overfit_batches", overfit_batches, 0)
        self.overfit_batches = overfit_batches
        self.reference_shards = reference_shards
        self.data = ShardData(**kwargs)
        # Written on a shared file system once, by global rank 0, while the other ranks wait (not once per node).
        self.prepare_data_per_node = False
        self._saved: dict[str, Any] | None = None        # the data position a resumed run's checkpoint holds
        self._start: tuple[int, int] | None = None       # (Lightning's processed batches, our position) at start

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

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _processed(self) -> int:
        trainer = self.trainer
        return trainer.fit_loop.epoch_loop.batch_progress.total.processed if trainer is not None else 0

    def train_dataloader(self) -> DataLoader | Iterable[dict]:
        loader = self.data.train_dataloader(self._world(), self._rank())
        if self.overfit_batches:
            return ReplayBatches(loader, self.overfit_batches, self.data.batches_per_epoch(self._world()))
        trainer = self.trainer
        if trainer is not None and trainer.fit_loop.restarting:
            epoch, done, unconsumed_first = self._resume_position()
            # A checkpoint written once an epoch's last batch completed, with validation on, makes Lightning first
            # finish that epoch (its validation) with an iteration it does not consume, which the stream must not
            # count as a data epoch. (Lightning's own epoch number may run one ahead.)
            self.data.set_position(epoch - unconsumed_first, done)
            self._start = (self._processed(), epoch * self.data.batches_per_epoch(self._world()) + done)
        elif trainer is not None and self._start is None:
            self._start = (self._processed(), 0)
        return loader

    def _resume_position(self) -> tuple[int, int, bool]:
        """(data epoch, batches per rank already trained on in it, whether Lightning first runs an iteration it
        does not consume) of a resumed run, at this run's world size.

        The checkpoint's position counts in its own world's batches; at another world size or batch (elastic
        resume) it is mapped through the global sample count: what was consumed is a prefix of the epoch's global
        sequence (``EpochStream``), so the resumed run starts at the first global batch not yet fully consumed,
        repeating less than one global batch."""
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        saved = self._saved or {}
        world, batch = saved.get("world", self._world()), saved.get("batch_size", self.batch_size)
        per_epoch = saved.get("batches_per_epoch", self.data.batches_per_epoch(world))
        # Without a saved position (a checkpoint of an earlier version): Lightning's counters, in this world's batches.
        epoch, done = (saved["epoch"], saved["done"]) if "epoch" in saved else divmod(progress.total.processed,
                                                                                      per_epoch)
        unconsumed_first = progress.current.completed >= per_epoch and self.trainer.enable_validation
        if (world, batch) != (self._world(), self.batch_size):
            consumed, now = done * batch * world, self.batch_size * self._world()
            mapped = consumed // now
            # Lightning's count of this epoch's batches (restored in the old world's batches) says when the epoch
            # ends: it must count the new world's, or a larger world would end the epoch early. Shifted as a whole,
            # so that the counters keep the relation Lightning restores them with.
            for counter in ("ready", "started", "processed", "completed"):
                setattr(progress.current, counter, getattr(progress.current, counter) + mapped - done)
            done = mapped
            log.info("world size %d -> %d: global batch %d -> %d (%d per device); data: epoch %d resumes at global "
                     "sample %d (batch %d of %d per rank, %d samples read again)", world, self._world(), batch * world,
                     now, self.batch_size, epoch, mapped * now, mapped, self.data.batches_per_epoch(self._world()),
                     consumed - mapped * now)
        return epoch, done, unconsumed_first

    def state_dict(self) -> dict[str, Any]:
        """The training data's position, in checkpoints: data epoch, batches per rank done in it, and the world
        size and per-device batch they count in (a resumed run maps them to its own world size)."""
        if self._start is None or self.trainer is None:
            return {}
        per_epoch = self.data.batches_per_epoch(self._world())
        processed_then, position_then = self._start
        epoch, done = divmod(position_then + self._processed() - processed_then, per_epoch)
        return {"epoch": epoch, "done": done, "world": self._world(), "batch_size": self.batch_size,
                "batches_per_epoch": per_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = dict(state_dict)

    def val_dataloader(self) -> DataLoader | list:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return self.data.val_dataloader(self._world(), rank)

    def reference_dataloader(self, resolution: int, batch_size: int, limit: int | None) -> DataLoader | list:
        """This rank's share of the reference images that sample metrics (FID, CLIP score) compare against and take
        their conditions from: ``limit`` images over all ranks of ``data.reference_shards`` (the image shards behind
        the training data: its validation images, or those its latent cache was encoded from), read in order."""
        if self.reference_shards is None:
            raise ValueError("data.reference_shards is not set: the sample-metric callbacks (FID, CLIP score) need "
                             "the image shards of a reference set, e.g. data.reference_shards=data/mine/val")
        reference = ShardData(train_shards=self.reference_shards, val_shards=self.reference_shards,
                              resolution=resolution, val_batch_size=batch_size, num_workers=0, val_limit=limit)
        return reference.val_dataloader(self._world(), self._rank())

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
