"""The manifest of a derived shard folder (the latent cache): what made it, and which build it is.

``manifest.json`` sits in the folder that holds the split folders (``<cache>/train``, ``<cache>/val``). Each
build writes a fresh ``build_id``; a reader that remembers the id it started with can tell when the folder
was rebuilt underneath it (by another run) and stop instead of mixing shards of two builds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ldm.utils.files import weights_fingerprint

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def manifest_folder(shards: Any) -> Path | None:
    """The folder holding the manifest of a shard spec (a split folder or brace pattern inside a cache), or None."""
    if not isinstance(shards, str | Path):
        return None
    spec = Path(str(shards).split("{")[0])
    return next((d for d in (spec, spec.parent, spec.parent.parent) if (d / MANIFEST).is_file()), None)


class CacheReplacedError(RuntimeError):
    """The shard folder was rebuilt while this run was reading it."""


def same_build(urls: Iterator[dict], folder: Path, build_id: str) -> Iterator[dict]:
    """A pipeline stage over shard url dicts: before each shard is opened, check that ``folder`` still holds
    the build that was there when reading began."""
    for item in urls:
        now = (read_manifest(folder) or {}).get("build_id")
        if now != build_id:
            raise CacheReplacedError(
                f"{folder} was rebuilt while this run was reading it (build {build_id} -> {now or 'none'}, e.g. by "
                "another run with another first stage): stopping rather than mixing latents of two first stages. "
                "Give each first stage its own cache folder (data.prepare.out_dir=...) and resume with "
                "ckpt_path=last")
        yield item


def made_by(manifest: dict, fingerprint: str) -> bool:
    """Whether a latent cache's manifest names the first-stage weights with this SHA-256."""
    return manifest.get("first_stage_sha256") == fingerprint


def check_cache_source(shards: Any, first_stage: str | Path) -> None:
    """Refuse a latent cache written by another first stage than the export ``first_stage`` (the manifest names
    the weights' SHA-256); a cache without a manifest is accepted with a warning."""
    folder = manifest_folder(shards)
    manifest = read_manifest(folder) if folder is not None else None
    if manifest is None:
        log.warning("no %s next to %s: cannot verify the latent cache was made by %s", MANIFEST, shards, first_stage)
        return
    expected = weights_fingerprint(first_stage)
    if not made_by(manifest, expected):
        raise ValueError(f"the latent cache {shards} was made by the first stage {manifest.get('first_stage')} "
                         f"(sha256 {str(manifest.get('first_stage_sha256'))[:12]}…), not by model.first_stage="
                         f"{first_stage} (sha256 {expected[:12]}…); rebuild it with scripts/cache_latents.py or "
                         "point data.prepare at this first stage")
