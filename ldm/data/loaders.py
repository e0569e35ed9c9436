"""DataLoaders over webdataset shards (no Lightning here: ``ldm.stages.data`` wraps them).

Training reads one global sequence per epoch split over ranks and workers (every sample of an epoch on one rank
only, every rank exactly ``batches_per_epoch`` batches, so no rank starves or waits at a collective; ``EpochStream``),
or resampled shards per rank (``partition=False``); validation reads every sample once, split over (rank, worker)
slots (by shard, or by sample when shards are fewer than slots), in a fixed order.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from ldm.data.decode import ImageTransform, SampleDecoder, SkipCounter
from ldm.data.manifest import check_cache_source, manifest_folder, read_manifest, same_build
from ldm.data.tar_reader import tar_samples
from ldm.utils.checks import require_int

log = logging.getLogger(__name__)


def expand_urls(spec: str | Sequence[str], name: str = "shards") -> list[str]:
    """Brace notation, a list, or a directory (all ``*.tar`` in it) -> sorted list of shard URLs.

    Local paths must exist; remote URLs (``scheme://``, ``pipe:``) are passed through.
    """
    specs = [spec] if isinstance(spec, str | Path) else list(spec)
    urls: list[str] = []
    for item in specs:
        item = str(item)
        if Path(item).is_dir():
            found = sorted(str(p) for p in Path(item).glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"{name}: directory {item} holds no .tar shards")
            urls += found
        else:
            urls += list(braceexpand(item))
    if not urls:
        raise ValueError(f"{name}: no shards in {spec!r}")
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{name}: {len(missing)} shard(s) do not exist, e.g. {missing[:3]}")
    return urls


def _seeded_order(n: int, *seed: int) -> list[int]:
    order = list(range(n))
    random.Random("-".join(map(str, seed))).shuffle(order)
    return order


class EpochStream(IterableDataset):
    """One rank's training batches, epoch after epoch, with every sample of an epoch read by one rank only.

    All ranks and DataLoader workers see the same global sequence per epoch: the shards in an order drawn from
    (seed, epoch), their samples in order, shuffled in blocks of ``shuffle_block`` (a permutation drawn per block),
    continued with another shard order only when an epoch asks for more samples than the data holds. Global batch t
    is the sequence's t-th run of ``batch_size x world`` samples; rank r takes the r-th ``batch_size`` of it, and
    within a rank, DataLoader worker ``t mod workers`` makes it (the order in which the DataLoader takes batches
    from its workers). So ranks read disjoint samples, no sample comes twice in an epoch while
    ``samples_per_epoch`` is at most the data's size, and what a run has consumed is always a prefix of the global
    sequence, whatever the world size: a resumed run starts at global batch ``start`` of its epoch, on any number
    of ranks (:meth:`set_position`). Every slot reads every shard of the epoch (decoding only its own samples): the
    I/O of a small data set read ``world x workers`` times; for data too large for that, ``data.partition=false``
    draws shards independently per rank (``ResampledShards``), without the guarantees.

    ``read(urls)`` turns an ordered shard list into raw samples; ``decode`` turns one into an example (raising
    what ``handler`` counts and skips); ``collate`` makes a batch.
    """

    def __init__(self, urls: list[str], read: Callable[[list[str]], Iterable[dict]],
                 decode: Callable[[dict, random.Random], dict],
                 handler: Callable[[Exception], bool], *, seed: int, world: int, rank: int, batch_size: int,
                 batches_per_epoch: int, shuffle_block: int):
        super().__init__()
        self.urls, self.read, self.decode, self.handler = urls, read, decode, handler
        self.seed, self.world, self.rank, self.batch_size = seed, world, rank, batch_size
        self.batches_per_epoch, self.shuffle_block = batches_per_epoch, shuffle_block
        self.epoch = -1  # incremented as each epoch's iteration starts (in each worker's copy)
        self.start = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_position(self, epoch: int, start: int) -> None:
        """The next iteration is epoch ``epoch`` from its global batch ``start`` on (set before it begins)."""
        self.epoch, self.start = epoch - 1, start

    def sequence(self, epoch: int) -> Iterator[dict]:
        """The epoch's global sequence of raw samples (endless: further shard orders follow the first)."""
        for repeat in itertools.count():
            order = [self.urls[i] for i in _seeded_order(len(self.urls), self.seed, epoch, repeat)]
            block: list[dict] = []
            read_any = False
            for block_index, sample in enumerate(itertools.chain(self.read(order), [None])):
                if sample is not None:
                    block.append(sample)
                    read_any = True
                if len(block) == self.shuffle_block or (sample is None and block):
                    yield from (block[i] for i in _seeded_order(len(block), self.seed, epoch, repeat, block_index))
                    block = []
            if not read_any:
                raise RuntimeError(f"the {len(self.urls)} training shards hold no readable sample (e.g. "
                                   f"{self.urls[0]}): no valid one to train on")

    def __iter__(self) -> Iterator[dict]:
        self.epoch += 1
        start, self.start = self.start, 0
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        chunk = self.batch_size
        stream = self.sequence(self.epoch)
        # Skip (without decoding) the global batches already consumed, then walk global batch by global batch.
        for _ in itertools.islice(stream, start * chunk * self.world):
            pass
        last: dict | None = None
        for t in range(start, self.batches_per_epoch):
            raw = list(itertools.islice(stream, chunk * self.world))
            if (t - start) % workers != worker:
                continue
            mine = raw[self.rank * chunk:(self.rank + 1) * chunk]
            examples = []
            for i, sample in enumerate(mine):
                # Augmentations drawn per sample from (seed, epoch, position): the same whatever the world size.
                at = (t * self.world + self.rank) * chunk + i
                try:
                    examples.append(self.decode(sample, random.Random(f"{self.seed}-{self.epoch}-{at}")))
                except Exception as err:  # noqa: BLE001 - counted and skipped as the handler says
                    if not self.handler(err):
                        raise
            if examples:
                last = collate(examples)
            elif last is None:
                raise RuntimeError(f"global batch {t}: none of its {len(mine)} samples on rank {self.rank} decoded")
            # A batch whose samples all failed repeats the previous one: every rank must make every batch.
            yield last


class ResampledStream(IterableDataset):
    """Shards drawn independently per rank and worker (``data.partition=false``): each slot opens only the shards
    it draws, for data sets too large for every slot to read (:class:`EpochStream`); samples may repeat within an
    epoch and across ranks. A resumed run skips the batches already trained on (same world size only)."""

    def __init__(self, pipeline: wds.DataPipeline, batches_per_epoch: int):
        super().__init__()
        self.pipeline = pipeline
        self.batches_per_epoch = batches_per_epoch
        self.skip = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_position(self, epoch: int, start: int) -> None:
        for stage in self.pipeline.pipeline:
            if hasattr(stage, "epoch"):  # ResampledShards, detshuffle: incremented at the start of an iteration
                stage.epoch = epoch - 1
        self.skip = start

    def __iter__(self):
        stream = iter(self.pipeline)
        if self.skip:
            info = get_worker_info()
            worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
            for _ in itertools.islice(stream, len(range(worker, self.skip, workers))):
                pass
            self.skip = 0
        yield from stream


def collate(samples: list[dict]) -> dict:
    """Stack images (or latents) and labels; keep captions and keys as lists of strings."""
    data_key = "image" if "image" in samples[0] else "latent"
    return {data_key: default_collate([s[data_key] for s in samples]),
            "class_label": torch.tensor([s["class_label"] for s in samples], dtype=torch.long),
            "caption": [s["caption"] for s in samples],
            "key": [s["key"] for s in samples]}


@wds.pipelinefilter
def _samples_of_slot(samples, world: int, rank: int):
    """Every (world x workers)-th sample from this (rank, DataLoader worker)'s offset; ranks vary fastest, so
    every rank has a sample as long as there are as many samples as ranks."""
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    yield from itertools.islice(samples, worker * world + rank, None, world * workers)


class ShardData:
    """Batches ``{image [-1,1] BCHW, caption list[str], class_label LongTensor, key list[str]}``.

    With ``kind="latent"`` the shards are a latent cache and batches carry ``latent``
    (posterior mean and std stacked on the channel axis) instead of ``image``.

    ``batch_size`` is per device. ``samples_per_epoch`` sets the length of a training epoch
    (global, over all ranks); ``prepare`` is an optional callable to run once per node before
    anything is read (e.g. writing the built-in dataset's shards). ``world`` is the number of
    data-parallel ranks. ``partition``: split each epoch's samples over the ranks (:class:`EpochStream`), or draw
    shards independently per rank (:class:`ResampledStream`). ``first_stage`` (latent caches): the export whose
    latents the cache must hold,
    checked against the cache's manifest by :meth:`check_source`.
    """

    def __init__(self, *, train_shards: str | Sequence[str], val_shards: str | Sequence[str] | None = None,
                 resolution: int = 64, batch_size: int = 32, val_batch_size: int | None = None,
                 num_workers: int = 2, shuffle_buffer: int = 1000, samples_per_epoch: int = 60000,
                 random_crop: bool = False, hflip: bool = False, caption_key: str = "txt",
                 label_key: str = "cls", required_keys: Sequence[str] = ("image",),
                 max_consecutive_errors: int = 1000, prepare: Callable[[], object] | None = None,
                 val_limit: int | None = None, kind: str = "image", first_stage: str | None = None,
                 partition: bool = True):
        if kind not in ("image", "latent"):
            raise ValueError(f"data.kind={kind!r}: expected 'image' or 'latent'")
        if not isinstance(partition, bool):
            raise ValueError(f"data.partition={partition!r}: expected true (split each epoch over the ranks) or false "
                             "(shards drawn independently per rank)")
        for name, value, least in (("resolution", resolution, 1), ("batch_size", batch_size, 1),
                                   ("val_batch_size", val_batch_size, 1), ("num_workers", num_workers, 0),
                                   ("shuffle_buffer", shuffle_buffer, 1), ("samples_per_epoch", samples_per_epoch, 1),
                                   ("val_limit", val_limit, 1)):
            require_int(f"data.{name}", value, least, optional=name in ("val_batch_size", "val_limit"))
        self.kind = kind
        self.partition = partition
        self.first_stage = first_stage
        self.train_spec, self.val_spec = train_shards, val_shards
        self.resolution = resolution
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_epoch = samples_per_epoch
        self.caption_key, self.label_key = caption_key, label_key
        self.required_keys = tuple(required_keys)
        self.prepare_fn = prepare
        self.val_limit = val_limit
        self.train_transform = ImageTransform(resolution, random_crop=random_crop, hflip=hflip)
        self.val_transform = ImageTransform(resolution)
        self.train_counter = SkipCounter(max_consecutive_errors)
        self._train_stream: EpochStream | ResampledStream | None = None
        self.val_counter = SkipCounter(max_consecutive_errors)

    def prepare(self) -> None:
        if self.prepare_fn is not None:
            self.prepare_fn()

    def check_source(self) -> None:
        """A latent cache must have been written by ``first_stage`` (every rank checks before reading)."""
        if self.kind == "latent" and self.first_stage is not None:
            check_cache_source(self.train_spec, self.first_stage)

    @staticmethod
    def _shard_list(urls: list[str], spec: Any, resampled: bool = False, seed: int = 0) -> list:
        """The pipeline's shard stages; shards of a folder with a manifest (the latent cache) are checked to be
        of the build that was there when this loader was made (``ldm.data.manifest.same_build``)."""
        stages = [wds.ResampledShards(urls, seed=seed, deterministic=True) if resampled
                  else wds.SimpleShardList(urls)]
        folder = manifest_folder(spec)
        build_id = (read_manifest(folder) or {}).get("build_id") if folder is not None else None
        if build_id is not None:
            stages.append(wds.pipelinefilter(same_build)(folder, build_id))
        return stages

    def _decoder(self, transform: ImageTransform, counter: SkipCounter, seed: int | None) -> SampleDecoder:
        required = tuple(k for k in self.required_keys if k != "image") if self.kind == "latent" else self.required_keys
        return SampleDecoder(transform, counter, self.caption_key, self.label_key, required, seed, self.kind)

    def batches_per_epoch(self, world: int = 1) -> int:
        """Training batches one rank reads per epoch (every worker reads its equal share)."""
        batches = max(1, self.samples_per_epoch // (self.batch_size * world))
        return math.ceil(batches / max(1, self.num_workers)) * max(1, self.num_workers)

    def train_dataloader(self, world: int = 1, rank: int = 0) -> DataLoader:
        """Rank ``rank`` of ``world``'s training batches: :class:`EpochStream` (``partition``, the default) or
        :class:`ResampledStream`. The order is seeded from torch's seed (the run's ``seed``) and the epoch."""
        urls = expand_urls(self.train_spec, "data.train_shards")
        counter = self.train_counter
        per_epoch = self.batches_per_epoch(world)
        seed = torch.initial_seed() % 2**31
        decoder = self._decoder(self.train_transform, counter, seed)
        if self.partition:
            def read(order: list[str]) -> Iterable[dict]:
                return wds.DataPipeline(*self._shard_list(order, self.train_spec), tar_samples(handler=counter))

            self._train_stream = EpochStream(urls, read, decoder, counter, seed=seed, world=world, rank=rank,
                                             batch_size=self.batch_size, batches_per_epoch=per_epoch,
                                             shuffle_block=self.shuffle_buffer)
        else:
            pipeline = wds.DataPipeline(
                *self._shard_list(urls, self.train_spec, resampled=True, seed=seed),
                tar_samples(handler=counter),
                wds.detshuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), seed=seed),
                wds.map(decoder, handler=counter),
                wds.batched(self.batch_size, collation_fn=collate, partial=False),
            ).with_epoch(per_epoch // max(1, self.num_workers))
            self._train_stream = ResampledStream(pipeline, per_epoch)
        # Its own generator for the workers' base seed: creating an iterator does not draw from the global RNG
        # (whose state a resumed run restores), so a resumed run draws the same noise as an unbroken one.
        return DataLoader(self._train_stream, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
                          generator=torch.Generator().manual_seed(seed))

    def set_position(self, epoch: int, done: int) -> None:
        """Continue the training stream at ``epoch``, past its first ``done`` batches per rank (a resumed run): the
        shard order and shuffle of that epoch, then the batches an unbroken run would see."""
        if self._train_stream is not None:
            self._train_stream.set_position(epoch, done)

    def val_dataloader(self, world: int = 1, rank: int = 0) -> DataLoader | list:
        """Rank ``rank`` of ``world`` validates its part, split again over its workers: whole shards when
        there are at least as many shards as (rank, worker) slots, else every slot reads the shards and
        keeps every n-th sample. Either way every slot gets data: a rank with none would leave the others
        waiting at the epoch-end reduction of the validation metrics, an idle worker would lose its share
        of ``val_limit``."""
        if self.val_spec is None:
            return []
        urls = expand_urls(self.val_spec, "data.val_shards")
        by_shard = len(urls) >= world * max(1, self.num_workers)
        reader = tar_samples(handler=self.val_counter)
        if by_shard:
            stages = [*self._shard_list(urls[rank::world], self.val_spec), wds.split_by_worker, reader]
        else:
            stages = [*self._shard_list(urls, self.val_spec), reader, _samples_of_slot(world, rank)]
        stages.append(wds.map(self._decoder(self.val_transform, self.val_counter, 0), handler=self.val_counter))
        if self.val_limit is not None:
            # Per slot (rounded up, so that no slot goes without): the same samples in every validation.
            stages.append(wds.slice(math.ceil(self.val_limit / (world * max(1, self.num_workers)))))
        stages.append(wds.batched(self.val_batch_size, collation_fn=collate, partial=True))
        return DataLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=self.num_workers)

    def skipped(self) -> dict[str, int]:
        """Counts so far: ``{train_skipped, train_valid, val_skipped, val_valid}``."""
        return {"train_skipped": self.train_counter.skipped, "train_valid": self.train_counter.valid,
                "val_skipped": self.val_counter.skipped, "val_valid": self.val_counter.valid}
