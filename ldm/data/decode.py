"""Turning raw webdataset samples into training examples, and accounting for the bad ones.

Decoding is done here rather than by webdataset's autodecoder so that every failure names
its shard and key, is counted across DataLoader workers, and never stops an epoch halfway.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import multiprocessing as mp
import random
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
LATENT_KEY = "latent.npy"
KINDS = ("image", "latent")


class BadSample(ValueError):
    """A sample that cannot become a training example (missing key, undecodable image...)."""


class SkipCounter:
    """Counts valid and skipped samples across DataLoader worker processes (shared memory).

    Used as a webdataset ``handler``: logs the failure (it names shard and key), counts it and
    lets the stream continue; after ``max_consecutive`` failures without a single valid sample
    it raises, so a dataset with nothing valid in it fails loudly instead of spinning forever.
    """

    def __init__(self, max_consecutive: int = 1000, max_warnings: int = 20):
        self._skipped = mp.Value("q", 0)
        self._valid = mp.Value("q", 0)
        self._consecutive = 0
        self.max_consecutive = max_consecutive
        self.max_warnings = max_warnings

    @property
    def skipped(self) -> int:
        return self._skipped.value

    @property
    def valid(self) -> int:
        return self._valid.value

    def ok(self) -> None:
        self._consecutive = 0
        with self._valid.get_lock():
            self._valid.value += 1

    def __call__(self, exn: Exception) -> bool:
        with self._skipped.get_lock():
            self._skipped.value += 1
            n = self._skipped.value
        self._consecutive += 1
        if n <= self.max_warnings:
            log.warning("skipping bad data: %s", " | ".join(str(a) for a in exn.args) or repr(exn))
        elif n == self.max_warnings + 1:
            log.warning("further bad-data warnings suppressed; the count is logged as data/skipped")
        if self._consecutive >= self.max_consecutive:
            raise RuntimeError(f"{self._consecutive} consecutive bad samples/shards and no valid one: the data "
                               f"is unusable (last error: {exn!r})") from exn
        return True


def to_rgb(image: Image.Image) -> Image.Image:
    """Any common PNG/JPEG mode as 8-bit RGB: 16/32-bit integer greyscale scaled to 8 bits (not clipped, which
    turns a 16-bit image almost white), float greyscale in [0, 1] scaled, transparency (RGBA, LA, PA, P with a
    transparent colour) composited on white, 1-bit, L, P, CMYK and YCbCr converted."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        else:
            arr = arr / 257.0  # 0..65535 -> 0..255 (PNG greyscale deeper than 8 bits opens as I or I;16)
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass
class ImageTransform:
    """Resize (shorter side), centre/random crop, optional horizontal flip, scale to [-1, 1] CHW float."""

    resolution: int
    random_crop: bool = False
    hflip: bool = False

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        image = to_rgb(image)
        w, h = image.size
        r = self.resolution
        if min(w, h) != r:
            scale = r / min(w, h)
            w, h = max(r, round(w * scale)), max(r, round(h * scale))
            image = image.resize((w, h), Image.Resampling.BICUBIC)
        if self.random_crop:
            left, top = rng.randint(0, w - r), rng.randint(0, h - r)
        else:
            left, top = (w - r) // 2, (h - r) // 2
        if (w, h) != (r, r):
            image = image.crop((left, top, left + r, top + r))
        arr = np.array(image, dtype=np.uint8)
        if self.hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()
        return x / 127.5 - 1.0


_NPY_V1 = b"\x93NUMPY\x01\x00"


@functools.lru_cache(maxsize=16)
def _npy_v1_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an .npy version-1.0 header (from its length field on)."""
    return np.lib.format.read_array_header_1_0(io.BytesIO(header))


def decode_latent(data: bytes) -> torch.Tensor:
    """``latent.npy`` bytes (posterior mean and std stacked on the channel axis) -> float32 tensor.

    Every record of a latent cache carries the same .npy header, whose parsing (a Python literal
    evaluation) was most of np.load's cost per record: it is parsed once and the array read in place.
    """
    if data[:8] == _NPY_V1 and len(data) >= 10:
        start = 10 + int.from_bytes(data[8:10], "little")
        shape, fortran_order, dtype = _npy_v1_header(data[8:start])
        if not fortran_order and not dtype.hasobject:
            array = np.frombuffer(data, dtype, count=math.prod(shape), offset=start).reshape(shape)
            return torch.from_numpy(array.astype(np.float32))
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


class SampleDecoder:
    """Raw ``{__key__, __url__, png|latent.npy, txt, cls}`` bytes -> ``{image|latent, caption, class_label}``."""

    def __init__(self, transform: ImageTransform, counter: SkipCounter, caption_key: str = "txt",
                 label_key: str = "cls", required: tuple[str, ...] = ("image",), seed: int | None = None,
                 kind: str = "image"):
        if kind not in KINDS:
            raise ValueError(f"data kind must be one of {KINDS}, not '{kind}'")
        self.kind, self.transform, self.counter = kind, transform, counter
        self.caption_key, self.label_key = caption_key, label_key
        self.required = tuple(required)
        self.seed = seed
        self._rng: random.Random | None = None

    @property
    def rng(self) -> random.Random:
        """Augmentation draws: seeded per (rank, worker) from ``seed`` when given (made where it is used)."""
        if self._rng is None:
            worker = wds.utils.pytorch_worker_seed()
            self._rng = random.Random(None if self.seed is None else self.seed * 100_003 + worker)
        return self._rng

    def _image(self, raw: dict, where: str, rng: random.Random | None = None) -> torch.Tensor:
        image_key = next((k for k in IMAGE_KEYS if k in raw), None)
        if image_key is None:
            raise BadSample(f"{where}: no image (expected one of {IMAGE_KEYS}; has {sorted(raw)})")
        try:
            with Image.open(io.BytesIO(raw[image_key])) as im:
                im.load()
                return self.transform(im, rng or self.rng)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise BadSample(f"{where}: undecodable {image_key} ({err})") from err

    def _latent(self, raw: dict, where: str) -> torch.Tensor:
        if LATENT_KEY not in raw:
            raise BadSample(f"{where}: no '{LATENT_KEY}' (has {sorted(raw)}); is this a latent cache?")
        try:
            return decode_latent(raw[LATENT_KEY])
        except (OSError, ValueError) as err:
            raise BadSample(f"{where}: undecodable {LATENT_KEY} ({err})") from err

    def __call__(self, raw: dict, rng: random.Random | None = None) -> dict:
        """The example of ``raw``; ``rng`` draws its augmentations (default: this worker's stream)."""
        where = f"shard {raw.get('__url__', '?')} key {raw.get('__key__', '?')}"
        data = self._image(raw, where, rng) if self.kind == "image" else self._latent(raw, where)
        caption = raw.get(self.caption_key)
        if caption is None and "caption" in self.required:
            raise BadSample(f"{where}: missing caption key '{self.caption_key}'")
        label = raw.get(self.label_key)
        if label is None and "class_label" in self.required:
            raise BadSample(f"{where}: missing class key '{self.label_key}'")
        try:
            label = int(label.decode() if isinstance(label, bytes) else label) if label is not None else -1
        except ValueError as err:
            raise BadSample(f"{where}: class key '{self.label_key}' is not an integer ({label!r})") from err
        caption = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else (caption or "")
        self.counter.ok()
        return {self.kind: data, "caption": caption, "class_label": label, "key": raw["__key__"]}
