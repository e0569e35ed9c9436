"""Tiny synthetic datasets in the layouts users bring: ImageNet's class folders and img2dataset's shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ["n01440764", "n01443537", "n01484850"]  # ImageNet-style class folder names


@pytest.fixture
def imagenet_layout(tmp_path: Path) -> Path:
    """3 class folders, 4 images each in mixed sizes and formats (PNG, JPEG, WebP, greyscale), one corrupt file."""
    root = tmp_path / "train"
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i, (suffix, size, mode) in enumerate([(".png", (40, 30), "RGB"), (".JPEG", (37, 53), "RGB"),
                                                  (".webp", (48, 48), "RGB"), (".png", (33, 33), "L")]):
            array = rng.integers(0, 256, (size[1], size[0], 3 if mode == "RGB" else 1), np.uint8).squeeze()
            Image.fromarray(array, mode).save(root / name / f"{name}_{i}{suffix}")
    (root / CLASSES[1] / "corrupt.png").write_bytes(b"\x89PNG not really")
    return root


def img2dataset_shards(out: Path, n: int = 24, per_shard: int = 12) -> Path:
    """Shards as img2dataset writes them: ``<key>.jpg``, ``<key>.txt``, ``<key>.json`` per sample, 9-digit keys."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for s in range(n // per_shard):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                key = f"{i:09d}"
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (40, 50, 3), np.uint8)).save(buf, format="JPEG")
                meta = {"url": f"http://example.com/{key}.jpg", "caption": f"photo {i}", "key": key, "status":
                        "success", "width": 50, "height": 40, "original_width": 500, "original_height": 400}
                for ext, payload in (("jpg", buf.getvalue()), ("txt", f"photo {i}".encode()),
                                     ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return out
