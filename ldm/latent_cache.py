"""The latent cache: encode a dataset once with the frozen first stage into latent shards.

Each record keeps the posterior's mean and std (``latent.npy``, float16, stacked on the channel
axis) with the caption and label, so stage 2 can still draw a fresh z ~ q(z|x) every step — the
same training distribution as online encoding, without running the encoder. ``manifest.json``
names the first stage and the SHA-256 of its weights; a cache made with another first stage is
rebuilt (or refused by the stage).
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import queue
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ldm.checkpoints import load_first_stage
from ldm.data.loaders import ShardData, expand_urls
from ldm.data.manifest import MANIFEST, made_by, read_manifest
from ldm.data.shards import write_records
from ldm.data.tar_reader import recorded_count
from ldm.networks.autoencoder import DiagonalGaussian
from ldm.utils.config import auto_precision
from ldm.utils.files import weights_fingerprint
from ldm.utils.progress import Progress

log = logging.getLogger(__name__)


def _records(batches: Iterator[tuple[np.ndarray, dict]]) -> Iterator[dict]:
    """Webdataset records from (stacked float16 latents, batch) pairs."""
    for stacked, batch in batches:
        for i, key in enumerate(batch["key"]):
            buf = io.BytesIO()
            np.save(buf, stacked[i], allow_pickle=False)
            record = {"__key__": key, "latent.npy": buf.getvalue(), "txt": batch["caption"][i]}
            if int(batch["class_label"][i]) >= 0:
                record["cls"] = str(int(batch["class_label"][i]))
            yield record


def resolve_device(device: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class PosteriorEncoder:
    """The frozen encoder's posterior (mean, std) of a batch of images, in bf16 where the device runs it natively
    (latents are stored in float16, so nothing kept is lost)."""

    def __init__(self, ae, device: torch.device):
        self.ae, self.device = ae, device
        self.bf16 = auto_precision(device.type) == "bf16-mixed"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            moments = self.ae.moments(images)
        post = DiagonalGaussian(moments.float())  # mean and std in float32 from the (bf16) moments
        return torch.cat([post.mean, post.std], dim=1).to(torch.float16)


def _expected_count(shards, limit: int | None) -> int | None:
    """The images a split will yield (its shards' recorded counts, capped by ``limit``), when known."""
    counts = [recorded_count(url) for url in expand_urls(shards, "data.prepare.splits")]
    total = None if not counts or any(c is None for c in counts) else sum(counts)
    known = [n for n in (total, limit) if n is not None]
    return min(known) if known else None


def _encode_split(loader, encode: PosteriorEncoder, out_dir: Path, split: str, samples_per_shard: int,
                  expected: int | None) -> list[Path]:
    """Encode on the device while a writer thread serialises the previous batches into shards.

    The loader's workers decode images, the main thread only moves batches to the device and results back,
    and the shards are written concurrently, so the accelerator is not left waiting on PNG decoding or tar
    writing.
    """
    done: queue.Queue = queue.Queue(maxsize=4)
    sentinel = object()

    def batches() -> Iterator[tuple[np.ndarray, dict]]:
        while (item := done.get()) is not sentinel:
            yield item

    def hand_over(item: object) -> bool:
        """Queue ``item`` for the writer; False when the writer has stopped (its error is raised below)."""
        while not writer.done():
            try:
                done.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    with ThreadPoolExecutor(1) as pool:
        writer = pool.submit(write_records, _records(batches()), out_dir / split, split, samples_per_shard)
        try:
            with Progress(expected, f"latent cache {split}", "img") as bar:
                for batch in loader:
                    latents = encode(batch["image"]).cpu().numpy()
                    if not hand_over((latents, {k: batch[k] for k in ("key", "caption", "class_label")})):
                        break
                    bar.update(len(latents))
        finally:
            hand_over(sentinel)
        return writer.result()


def _swap_into_place(built: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the complete ``built`` folder with renames (a reader never sees a half-written cache)."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(built, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def prepare_latent_cache(first_stage: str | Path, splits: dict[str, str], out_dir: str | Path,
                         image_prepare: Callable[[], object] | None = None, batch_size: int = 128,
                         samples_per_shard: int = 5000, num_workers: int = 2, device: str = "auto",
                         limits: dict[str, int | None] | None = None) -> Path:
    """Write ``out_dir/<split>/*.tar`` latent shards for each ``split: image shards`` entry, once.

    Reused when the manifest names the same first-stage weights and splits; ``image_prepare`` (e.g. the
    built-in dataset's writer) runs first when given. ``limits`` caps a split's sample count (e.g. the
    validation subset that training validates on). Encodes on ``device`` (``auto``: the GPU when there is
    one) with ``num_workers`` loader processes, shows progress, and builds into a temporary folder that
    replaces ``out_dir`` only when complete.
    """
    limits = {k: v for k, v in (limits or {}).items() if v is not None}
    out_dir = Path(out_dir)
    fingerprint = weights_fingerprint(first_stage)

    def current() -> bool:
        manifest = read_manifest(out_dir)
        return manifest is not None and made_by(manifest, fingerprint) and \
            set(manifest.get("splits", {})) >= set(splits) and manifest.get("limits", {}) == limits

    if current():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (another run may be building the same cache): wait for it, then look again.
    with open(out_dir.with_name(f".{out_dir.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if current():
            return out_dir
        _build(first_stage, fingerprint, splits, out_dir, image_prepare, batch_size, samples_per_shard, num_workers,
               device, limits)
    return out_dir


def _build(first_stage: str | Path, fingerprint: str, splits: dict[str, str], out_dir: Path,
           image_prepare: Callable[[], object] | None, batch_size: int, samples_per_shard: int, num_workers: int,
           device: str, limits: dict[str, int]) -> None:
    if read_manifest(out_dir) is not None:
        log.warning("latent cache %s was made with another first stage or splits; rebuilding", out_dir)
    if image_prepare is not None:
        image_prepare()
    dev = resolve_device(device)
    ae = load_first_stage(first_stage, device=dev)
    encode = PosteriorEncoder(ae, dev)
    built = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}")
    shutil.rmtree(built, ignore_errors=True)
    built.mkdir(parents=True)
    counts = {}
    try:
        for split, shards in splits.items():
            dm = ShardData(train_shards=shards, val_shards=shards, resolution=ae.resolution,
                           val_batch_size=batch_size, num_workers=num_workers, val_limit=limits.get(split))
            start = time.perf_counter()
            expected = _expected_count(shards, limits.get(split))
            written = _encode_split(dm.val_dataloader(), encode, built, split, samples_per_shard, expected)
            valid = dm.skipped()["val_valid"] if num_workers == 0 else None
            counts[split] = {"shards": len(written), "skipped": dm.skipped()["val_skipped"]}
            log.info("latent cache %s: %d shards in %.1f s on %s%s", split, len(written), time.perf_counter() - start,
                     dev, "" if valid is None else f" ({valid} images)")
        doc = {"build_id": uuid.uuid4().hex, "first_stage": str(first_stage), "first_stage_sha256": fingerprint,
               "embed_dim": ae.embed_dim,
               "downsampling_factor": ae.downsampling_factor, "resolution": ae.resolution, "splits": counts,
               "limits": limits}
        (built / MANIFEST).write_text(json.dumps(doc, indent=2))
        _swap_into_place(built, out_dir)
    finally:
        shutil.rmtree(built, ignore_errors=True)
