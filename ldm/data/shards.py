"""Writing webdataset shards atomically, and turning a user's image folder into shards.

A shard is first written as ``<name>.tmp`` and renamed when complete, so a killed writer
never leaves a truncated ``.tar`` that readers would pick up.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image

from ldm.data.decode import to_rgb
from ldm.data.tar_reader import SHARD_INDEX
from ldm.utils.progress import track

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Sample:
    """One training example as stored in a shard."""

    key: str
    image: Image.Image
    caption: str | None = None
    label: int | None = None


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_records(records: Iterable[dict], out_dir: str | Path, prefix: str, samples_per_shard: int = 5000,
                  ) -> list[Path]:
    """Write webdataset records (``{"__key__": ..., "<ext>": bytes|str}``) to ``out_dir/prefix-000000.tar, ...``
    atomically: each shard is written as ``.tmp`` and renamed when complete. Returns the shard paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    writer: wds.TarWriter | None = None
    tmp: Path | None = None
    count = 0
    counts: dict[str, int] = {}

    def close() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            final = tmp.with_suffix("")
            os.replace(tmp, final)
            written.append(final)
            counts[final.name] = count - samples_per_shard * (len(written) - 1)
            record_counts(out_dir, counts)
            writer = None

    try:
        for record in records:
            if count % samples_per_shard == 0:
                close()
                tmp = out_dir / f"{prefix}-{len(written):06d}.tar.tmp"
                # Whole-second mtime: plain ustar headers. A float mtime adds a pax header to every member,
                # which doubled the header parsing and made a latent-cache shard 1.75x larger (reading 1.55x slower).
                writer = wds.TarWriter(str(tmp), mtime=int(time.time()))
            writer.write(record)
            count += 1
        close()
    finally:
        if writer is not None:  # interrupted: drop the partial shard, keep the finished ones
            writer.close()
            tmp.unlink(missing_ok=True)
    return written


def record_counts(out_dir: Path, counts: dict[str, int]) -> None:
    """Merge ``{shard name: samples}`` into the folder's shard index (readers warn about shards holding fewer)."""
    index = out_dir / SHARD_INDEX
    try:
        merged = json.loads(index.read_text()) | counts
    except (OSError, ValueError):
        merged = dict(counts)
    tmp = index.with_name(f".{index.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=0, sort_keys=True))
    os.replace(tmp, index)


def sample_record(sample: Sample) -> dict:
    record = {"__key__": sample.key, "png": encode_png(to_rgb(sample.image))}
    if sample.caption is not None:
        record["txt"] = sample.caption
    if sample.label is not None:
        record["cls"] = str(int(sample.label))
    return record


def write_shards(samples: Iterable[Sample], out_dir: str | Path, prefix: str, samples_per_shard: int = 5000,
                 ) -> list[Path]:
    """Write image samples (png, txt, cls) as shards; see :func:`write_records`."""
    return write_records(map(sample_record, samples), out_dir, prefix, samples_per_shard)


def resize_square(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to ``resolution`` and centre-crop to a square."""
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _folder_samples(files: list[Path], root: Path, resolution: int | None, default_caption: str | None
                    ) -> Iterator[Sample]:
    for path in track(files, len(files), "images -> shards", "img"):
        try:
            with Image.open(path) as im:
                im.load()  # to_rgb may return this image itself, which must not need its file once closed
                image = to_rgb(im)
        except (OSError, ValueError) as err:
            log.warning("skipping %s: not a readable image (%s)", path, err)
            continue
        if resolution is not None:
            image = resize_square(image, resolution)
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.exists() else default_caption
        key = str(path.relative_to(root).with_suffix("")).replace(os.sep, "__").replace(".", "_")
        yield Sample(key=key, image=image, caption=caption)


def folder_to_shards(folder: str | Path, out_dir: str | Path, prefix: str = "data", resolution: int | None = None,
                     samples_per_shard: int = 5000, default_caption: str | None = "") -> list[Path]:
    """Convert every image under ``folder`` (recursively) with optional same-stem ``.txt`` captions.

    Images are optionally resized + centre-cropped to ``resolution``. Unreadable files are skipped
    with a warning. Returns the written shard paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
    shards = write_shards(_folder_samples(files, folder, resolution, default_caption), out_dir, prefix,
                          samples_per_shard)
    log.info("converted %d image files into %d shards in %s", len(files), len(shards), out_dir)
    return shards


