"""Feature extractors for FID: torch-fidelity's InceptionV3 (the standard) or an offline classifier.

Both take float images in [0, 1] (B, 3, H, W) and return (B, D) features, and carry a ``name``
that says in logs and metric keys which feature space a number was measured in: FIDs from
different extractors are not comparable.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoints import load_classifier, read_state_dict

log = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def inception_cache_path() -> Path:
    """Where torch-fidelity (and torchmetrics through it) caches the FID Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def resolve_inception_weights(weights: str | Path | None) -> Path:
    """The configured file, else torch-fidelity's cache; a clear error naming both when neither exists."""
    candidates = [Path(weights).expanduser()] if weights else []
    candidates.append(inception_cache_path())
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"FID Inception weights not found (looked for {', '.join(str(p) for p in candidates)}). Download "
        f"{INCEPTION_URL} where there is internet and put it at {inception_cache_path()} or pass its path as "
        "inception_weights=...; or use the offline classifier extractor (extractor=classifier).")


class InceptionFeatures(nn.Module):
    """2048-d pool features of the FID InceptionV3 (torch-fidelity's port of the TF graph)."""

    num_features = 2048

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        path = resolve_inception_weights(weights)
        # Read with weights_only=True here (torch-fidelity itself unpickles without that guard), then hand
        # torch-fidelity a copy holding nothing but those tensors.
        state = read_state_dict(path, "Inception weights")
        with tempfile.TemporaryDirectory() as tmp:
            safe = Path(tmp) / INCEPTION_FILE
            torch.save(state, safe)
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=str(safe))
        self.name = "inception"
        self.description = f"InceptionV3 pool3 2048-d ({path})"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.clamp(0, 1) * 255).round().to(torch.uint8)).reshape(len(images), -1)


class ClassifierFeatures(nn.Module):
    """Penultimate features of the exported Fashion-MNIST classifier: an offline FID feature space."""

    def __init__(self, path: str | Path = "exports/fashion_classifier"):
        super().__init__()
        self.net = load_classifier(path)
        self.num_features = self.net.head.in_features
        self.name = "classifier"
        self.description = f"Fashion-MNIST classifier {self.num_features}-d penultimate features ({path})"

    def train(self, mode: bool = True) -> ClassifierFeatures:
        return super().train(False)  # always in eval mode (BatchNorm statistics, dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images.float() * 2 - 1)


def build_extractor(extractor: str, weights: str | Path | None = None) -> nn.Module:
    """``inception`` (``weights``: the Inception file, default torch-fidelity's cache) or
    ``classifier`` (``weights``: the exported classifier folder)."""
    if extractor == "inception":
        return InceptionFeatures(weights)
    if extractor == "classifier":
        return ClassifierFeatures(weights or "exports/fashion_classifier")
    raise ValueError(f"FID extractor must be 'inception' or 'classifier', not '{extractor}'")
