"""A user's image folder as webdataset shards: labels from class subfolders, captions from files or a metadata
table, converted in parallel and resumably.

- Labels (``labels="folders"``): the first folder under the root names the class (ImageNet's ``train/<wnid>/``
  layout); classes are numbered in sorted name order and the map is written beside the shards as
  ``classes.json`` (``{"names": [...]}``: index -> name).
- Captions, first found: a metadata table (``captions=`` a ``.csv``, ``.jsonl``, ``.json`` list or ``.parquet``
  file, img2dataset/LAION style: a ``key``, ``file``, ``filename`` or ``path`` column naming the image by stem or
  relative path, and a ``caption`` or ``text`` column), then a same-stem ``.txt`` file, then a same-stem
  ``.json`` file's ``caption``, then ``default_caption``.
- Images are stored at their size, or resized (short side) and centre-cropped to ``resolution``.
- The sorted file list is cut into shards of ``samples_per_shard`` files; shard ``i`` always holds the same
  files, so a conversion that is run again keeps the finished shards (each is written as ``.tmp`` and renamed
  when complete) and writes only the missing ones. The files and settings are recorded (``conversion.json``):
  running another conversion into a folder of finished shards (images added, other settings) is an error, not a
  mix. ``workers`` processes convert shards in parallel.
- Unreadable files are skipped; the summary counts what was written, kept and skipped, and says why.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ldm.data.decode import to_rgb
from ldm.data.shards import IMAGE_SUFFIXES, Sample, record_counts, resize_square, sample_record, write_shard

log = logging.getLogger(__name__)

CLASS_INDEX = "classes.json"
CONVERSION = "conversion.json"  # the settings and file list finished shards were made with
LABEL_SOURCES = (None, "folders")
KEY_COLUMNS = ("key", "file", "filename", "path")
CAPTION_COLUMNS = ("caption", "text", "txt")


@dataclass
class Conversion:
    """What a conversion did: every shard of the folder, and how many were written now or kept from before."""

    shards: list[Path]
    written: int = 0
    kept: int = 0
    images: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # file -> why
    classes: list[str] | None = None

    def summary(self) -> str:
        why = "; ".join(f"{Path(f).name}: {r}" for f, r in list(self.skipped.items())[:5])
        more = f" (and {len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
        return (f"{len(self.shards)} shards: {self.written} written ({self.images} images), {self.kept} kept from an "
                f"earlier run; {len(self.skipped)} files skipped" + (f": {why}{more}" if self.skipped else ""))


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def class_names(files: list[Path], root: Path) -> list[str]:
    """The class folders (first folder under ``root``) of ``files``, sorted: index -> name."""
    loose = [f for f in files if len(f.relative_to(root).parts) < 2]
    if loose:
        raise ValueError(f"--labels folders: {loose[0]} is not inside a class folder (expected {root}/<class>/...; "
                         f"{len(loose)} such files)")
    return sorted({f.relative_to(root).parts[0] for f in files})


def read_caption_table(path: str | Path) -> dict[str, str]:
    """``{image key: caption}`` from a CSV, JSONL, JSON-list or Parquet metadata file (img2dataset/LAION style)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions={path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif suffix == ".json":
        rows = json.loads(path.read_text())
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ValueError(f"captions={path}: reading Parquet needs pyarrow (pip install pyarrow), or give the "
                             "table as .csv or .jsonl") from err
        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"captions={path}: expected a .csv, .jsonl, .json or .parquet table")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"captions={path}: no rows")
    columns = set(rows[0])
    key = next((c for c in KEY_COLUMNS if c in columns), None)
    text = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if key is None or text is None:
        raise ValueError(f"captions={path}: expected a key column (one of {list(KEY_COLUMNS)}) and a caption column "
                         f"(one of {list(CAPTION_COLUMNS)}); found {sorted(columns)}")
    return {str(row[key]): str(row[text]) for row in rows if row.get(key) is not None and row.get(text) is not None}


def table_names(path: Path, root: Path) -> tuple[str, ...]:
    """The names a metadata table may give an image by: relative path with and without suffix, name, stem."""
    relative = path.relative_to(root)
    return str(relative), str(relative.with_suffix("")), path.name, path.stem


def caption_of(path: Path, root: Path, table: dict[str, str], default: str | None) -> str | None:
    for name in table_names(path, root):
        if name in table:
            return table[name]
    text = path.with_suffix(".txt")
    if text.is_file():
        return text.read_text().strip()
    meta = path.with_suffix(".json")
    if meta.is_file():
        try:
            caption = json.loads(meta.read_text()).get("caption")
        except (ValueError, AttributeError):
            caption = None
        if caption is not None:
            return str(caption)
    return default


def check_same_conversion(out_dir: Path, prefix: str, settings: dict) -> None:
    """Finished shards are kept only when they come from the same conversion (the same files, in the same shards,
    with the same settings): the settings are recorded beside them (``conversion.json``), and shards of another
    conversion are an error rather than mixed in."""
    record = out_dir / CONVERSION
    if record.is_file() and any(out_dir.glob(f"{prefix}-*.tar")):
        try:
            before = json.loads(record.read_text())
        except ValueError:
            before = None
        changed = sorted(k for k in settings if not isinstance(before, dict) or before.get(k) != settings[k])
        if changed:
            what = ", ".join("the image files" if k == "files" else k for k in changed)
            raise ValueError(f"{out_dir} holds shards of another conversion ({what} differ from {record}): convert "
                             "into a new out_dir, or remove those shards to convert again")
    record.write_text(json.dumps(settings, indent=1))


@dataclass
class _Job:
    """One shard's worth of files and how to turn them into samples (sent to a worker process)."""

    path: Path
    files: list[Path]
    root: Path
    resolution: int | None
    classes: list[str] | None
    table: dict[str, str]
    default_caption: str | None


def _samples(job: _Job, skipped: dict[str, str]) -> Iterator[Sample]:
    index = {name: i for i, name in enumerate(job.classes or [])}
    for path in job.files:
        try:
            with Image.open(path) as im:
                im.load()
                image = to_rgb(im)
        except (OSError, ValueError, SyntaxError) as err:
            skipped[str(path)] = f"not a readable image ({type(err).__name__}: {err})"
            continue
        if job.resolution is not None:
            image = resize_square(image, job.resolution)
        relative = path.relative_to(job.root)
        key = str(relative.with_suffix("")).replace(os.sep, "__").replace(".", "_")
        label = index[relative.parts[0]] if job.classes is not None else None
        yield Sample(key=key, image=image, caption=caption_of(path, job.root, job.table, job.default_caption),
                     label=label)


def _convert(job: _Job) -> tuple[str, int, dict[str, str]]:
    skipped: dict[str, str] = {}
    count = write_shard(map(sample_record, _samples(job, skipped)), job.path)
    return job.path.name, count, skipped


def folder_to_shards(folder: str | Path, out_dir: str | Path, prefix: str = "data", resolution: int | None = None,
                     samples_per_shard: int = 5000, default_caption: str | None = "", labels: str | None = None,
                     captions: str | Path | None = None, workers: int = 1) -> Conversion:
    """Convert every image under ``folder`` into shards in ``out_dir`` (see the module's description)."""
    folder, out_dir = Path(folder), Path(out_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if labels not in LABEL_SOURCES:
        raise ValueError(f"labels={labels!r}: expected 'folders' (one folder per class) or none")
    for name, value in (("samples_per_shard", samples_per_shard), ("workers", workers)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected an integer >= 1")
    files = list_images(folder)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
    classes = class_names(files, folder) if labels == "folders" else None
    table = read_caption_table(captions) if captions is not None else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    check_same_conversion(out_dir, prefix, {
        "folder": str(folder.resolve()), "samples_per_shard": samples_per_shard, "resolution": resolution,
        "labels": labels, "files": hashlib.sha256("\n".join(str(f.relative_to(folder)) for f in files).encode())
        .hexdigest(), "captions": None if captions is None else str(Path(captions).resolve())})
    if classes is not None:
        index = out_dir / CLASS_INDEX
        if index.is_file() and json.loads(index.read_text()).get("names") != classes:
            raise ValueError(f"{index} names other classes than the folders of {folder}: convert into a new "
                             "out_dir (or remove that folder's shards)")
        index.write_text(json.dumps({"names": classes}, indent=1))
    for stale in out_dir.glob(f"{prefix}-*.tar.tmp"):  # a killed run's partial shard
        stale.unlink()
    chunks = [files[start:start + samples_per_shard] for start in range(0, len(files), samples_per_shard)]
    jobs = [_Job(out_dir / f"{prefix}-{i:06d}.tar", chunk, folder, resolution, classes,
                 {n: table[n] for f in chunk for n in table_names(f, folder) if n in table},  # its captions only
                 default_caption) for i, chunk in enumerate(chunks)]
    result = Conversion(shards=[job.path for job in jobs], classes=classes)
    todo = [job for job in jobs if not job.path.is_file()]
    result.kept = len(jobs) - len(todo)
    if result.kept:
        log.info("%d of %d shards are already in %s: kept", result.kept, len(jobs), out_dir)
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=min(workers, max(1, len(todo)))) as pool:
        futures = [pool.submit(_convert, job) for job in todo]
        for done, future in enumerate(as_completed(futures), 1):
            try:
                name, count, skipped = future.result()
            except BaseException:
                for pending in futures:  # stop soon: finished shards stay, the rest is written by the next run
                    pending.cancel()
                raise
            record_counts(out_dir, {name: count})
            result.written += 1
            result.images += count
            result.skipped |= skipped
            log.info("shard %s: %d images (%d/%d shards, %.0f img/s)", name, count, done, len(todo),
                     result.images / max(time.perf_counter() - start, 1e-9))
    result.shards = [path for path in result.shards if path.is_file()]  # a shard of unreadable files only: none
    for path, why in result.skipped.items():
        log.warning("skipped %s: %s", path, why)
    log.info("%s -> %s: %s", folder, out_dir, result.summary())
    return result
