"""File names of an export folder, and the file digest that ties a latent cache to the export that made it."""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


def weights_fingerprint(export_dir: str | Path) -> str:
    """SHA-256 of an export folder's ``model.safetensors``."""
    digest = hashlib.sha256()
    with open(Path(export_dir) / WEIGHTS, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
