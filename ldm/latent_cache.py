"""The latent cache: encode a dataset once with the frozen first stage into latent shards.

Each record keeps the posterior's mean and std (``latent.npy``, float16, stacked on the channel
axis) with the caption and label, so stage 2 can still draw a fresh z ~ q(z|x) every step — the
same training distribution as online encoding, without running the encoder. ``manifest.json``
names the first stage and the SHA-256 of its weights; a cache made with another first stage is
rebuilt (or refused by the stage).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from ldm.checkpoints import WEIGHTS, load_first_stage
from ldm.data.loaders import ShardData
from ldm.data.shards import write_records
from ldm.networks.autoencoder import DiagonalGaussian
from ldm.utils.config import auto_precision

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def weights_fingerprint(first_stage_dir: str | Path) -> str:
    """SHA-256 of an exported first stage's ``model.safetensors``."""
    digest = hashlib.sha256()
    with open(Path(first_stage_dir) / WEIGHTS, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(cache_dir: str | Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _records(loader, encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> Iterator[dict]:
    for batch in loader:
        mean, std = encode(batch["image"])
        stacked = torch.cat([mean, std], dim=1).to(torch.float16).cpu().numpy()
        for i, key in enumerate(batch["key"]):
            buf = io.BytesIO()
            np.save(buf, stacked[i], allow_pickle=False)
            record = {"__key__": key, "latent.npy": buf.getvalue(), "txt": batch["caption"][i]}
            if int(batch["class_label"][i]) >= 0:
                record["cls"] = str(int(batch["class_label"][i]))
            yield record


def prepare_latent_cache(first_stage: str | Path, splits: dict[str, str], out_dir: str | Path,
                         image_prepare: Callable[[], object] | None = None, batch_size: int = 128,
                         samples_per_shard: int = 5000, num_workers: int = 2, device: str = "cpu",
                         limits: dict[str, int | None] | None = None) -> Path:
    """Write ``out_dir/<split>/*.tar`` latent shards for each ``split: image shards`` entry, once.

    Reused when the manifest names the same first-stage weights and splits; ``image_prepare`` (e.g. the
    built-in dataset's writer) runs first when given. ``limits`` caps a split's sample count (e.g. the
    validation subset that training validates on).
    """
    limits = {k: v for k, v in (limits or {}).items() if v is not None}
    out_dir = Path(out_dir)
    fingerprint = weights_fingerprint(first_stage)
    manifest = read_manifest(out_dir)
    if manifest is not None and manifest.get("first_stage_sha256") == fingerprint and \
            set(manifest.get("splits", {})) >= set(splits) and manifest.get("limits", {}) == limits:
        return out_dir
    if manifest is not None:
        log.warning("latent cache %s was made with another first stage or splits; rebuilding", out_dir)
        (out_dir / MANIFEST).unlink()
    if image_prepare is not None:
        image_prepare()
    ae = load_first_stage(first_stage, device=device)
    # Latents are stored in float16, so encoding in bf16 (where the hardware runs it) loses nothing that
    # is kept and roughly halves the time.
    use_bf16 = auto_precision(device) == "bf16-mixed"

    @torch.no_grad()
    def encode(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=use_bf16):
            moments = ae.quant_conv(ae.encoder(images.to(device)))
        post = DiagonalGaussian(moments.float())
        return post.mean, post.std

    counts = {}
    for split, shards in splits.items():
        dm = ShardData(train_shards=shards, val_shards=shards, resolution=ae.resolution, val_batch_size=batch_size,
                           num_workers=num_workers, val_limit=limits.get(split))
        for stale in (out_dir / split).glob("*.tar"):
            stale.unlink()
        written = write_records(_records(dm.val_dataloader(), encode), out_dir / split, split, samples_per_shard)
        counts[split] = {"shards": len(written), "skipped": dm.skipped()["val_skipped"]}
        log.info("latent cache %s: %d shards in %s", split, len(written), out_dir / split)
    doc = {"first_stage": str(first_stage), "first_stage_sha256": fingerprint, "embed_dim": ae.embed_dim,
           "downsampling_factor": ae.downsampling_factor, "resolution": ae.resolution, "splits": counts,
           "limits": limits}
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(out_dir / MANIFEST)
    return out_dir
