"""The built-in dataset: Fashion-MNIST (Xiao et al. 2017) written as webdataset shards.

Source, in order: a directory given by the caller, the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``), or a download from the dataset's official location.
Each sample: ``png`` (RGB, resized to ``resolution``), ``txt`` ("a photo of a sneaker"), ``cls``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.manifest import MANIFEST
from ldm.data.shards import Sample, write_shards
from ldm.utils.progress import track

log = logging.getLogger(__name__)

CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def caption_for(label: int) -> str:
    """The text prompt of a class: "a photo of a sneaker"."""
    name = CLASS_NAMES[label]
    article = "an" if name[0] in "aeiou" else "a"
    return f"a photo of {article} {name}"


def class_prompts() -> list[str]:
    """The ten class captions in label order ("a photo of a t-shirt", ...): the default sampling prompts."""
    return [caption_for(i) for i in range(len(CLASS_NAMES))]


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (LeCun's MNIST format) into a uint8 array."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def find_source(source_dir: str | Path | None = None, download_dir: str | Path | None = None) -> Path:
    """Directory holding the four idx .gz files; downloads them into ``download_dir`` as a last resort."""
    needed = [name for pair in FILES.values() for name in pair]
    candidates = [Path(source_dir)] if source_dir else [DEBIAN_DIR]
    for cand in candidates:
        if all((cand / name).is_file() for name in needed):
            return cand
    if source_dir:
        missing = [n for n in needed if not (Path(source_dir) / n).is_file()]
        raise FileNotFoundError(f"Fashion-MNIST source_dir={source_dir} lacks {missing}")
    if download_dir is None:
        raise FileNotFoundError(f"Fashion-MNIST not found in {DEBIAN_DIR}: run "
                                "`apt-get install dataset-fashion-mnist` or pass source_dir=<dir with idx .gz files>")
    target = Path(download_dir)
    target.mkdir(parents=True, exist_ok=True)
    for name in needed:
        if not (target / name).is_file():
            log.info("downloading %s%s", OFFICIAL_URL, name)
            tmp = target / f"{name}.tmp"
            try:
                urllib.request.urlretrieve(OFFICIAL_URL + name, tmp)
            except OSError as err:
                tmp.unlink(missing_ok=True)
                raise FileNotFoundError(
                    f"Fashion-MNIST is not installed ({DEBIAN_DIR}) and downloading {OFFICIAL_URL + name} failed "
                    f"({err}). Run `apt-get install dataset-fashion-mnist` or pass source_dir=<dir>.") from err
            tmp.rename(target / name)
    return target


def _samples(images: np.ndarray, labels: np.ndarray, resolution: int, split: str) -> Iterator[Sample]:
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        im = Image.fromarray(img, mode="L")
        if resolution != im.size[0]:
            im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
        yield Sample(key=f"{split}_{i:06d}", image=im.convert("RGB"), caption=caption_for(int(label)),
                     label=int(label))


def prepare(out_dir: str | Path, resolution: int = 64, source_dir: str | Path | None = None,
            samples_per_shard: int = 5000, limit: int | None = None) -> Path:
    """Write ``out_dir/{train,val}/*.tar`` once; reuses them when the manifest matches.

    ``limit`` keeps only the first N samples of each split (tests, smoke runs).
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    wanted = {"dataset": "fashion-mnist", "resolution": resolution, "samples_per_shard": samples_per_shard,
              "limit": limit}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in wanted} == wanted:
            return out_dir
        log.warning("%s was written with other settings %s; rewriting with %s", out_dir, manifest, wanted)
        manifest_path.unlink()
    source = find_source(source_dir, download_dir=out_dir / "raw")
    counts = {}
    for split, (img_file, lbl_file) in FILES.items():
        images, labels = read_idx(source / img_file), read_idx(source / lbl_file)
        if len(images) != len(labels):
            raise ValueError(f"{source}: {len(images)} images but {len(labels)} labels in split {split}")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        for stale in (out_dir / split).glob("*.tar"):
            stale.unlink()
        samples = track(_samples(images, labels, resolution, split), len(images), f"Fashion-MNIST {split} shards",
                        "img")
        shards = write_shards(samples, out_dir / split, split, samples_per_shard)
        counts[split] = {"samples": len(images), "shards": len(shards)}
        log.info("Fashion-MNIST %s: %d samples -> %d shards in %s", split, len(images), len(shards), out_dir / split)
    # The manifest is written last: its presence means every shard is complete.
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(wanted | {"splits": counts, "classes": list(CLASS_NAMES)}, indent=2))
    tmp.replace(manifest_path)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="data/fashion_mnist_64")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--source-dir", default=None)
    parser.add_argument("--samples-per-shard", type=int, default=5000)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prepare(args.out_dir, args.resolution, args.source_dir, args.samples_per_shard, args.limit)


if __name__ == "__main__":
    main()
