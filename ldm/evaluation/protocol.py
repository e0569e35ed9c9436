"""The FID protocol for the paper recipes: reference statistics computed once and cached, N samples streamed.

- ``ReferenceStats``: the real set's feature mean and covariance (float64), the conditions to generate for
  (its captions; class labels are balanced over the classes instead), and up to ``keep`` of its features for
  precision/recall. Saved to one file (``torch.save`` of plain tensors and a JSON header, read back with
  ``weights_only=True``) together with what it was computed from, so a file made with another extractor,
  resolution or reference set is refused instead of silently compared against.
- ``evaluate``: N samples (50k by default in scripts/evaluate.py) generated in chunks, their features
  accumulated as sums (memory independent of N), FID against the reference statistics, and improved
  precision/recall (Kynkäänniemi et al. 2019, k-NN radii in the same feature space) on up to ``keep`` features
  of each side.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.evaluation.samples import Conditions, generate
from ldm.pipeline import LatentDiffusionPipeline

log = logging.getLogger(__name__)
FORMAT = "ldm-reference-stats-1"


class FeatureMoments:
    """Streaming sum and sum of outer products of features (float64), plus the first ``keep`` features."""

    def __init__(self, dim: int, keep: int):
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.count, self.keep = 0, keep
        self.kept: list[torch.Tensor] = []

    def update(self, features: torch.Tensor) -> None:
        f = features.detach().to("cpu", torch.float64)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        self.count += len(f)
        room = self.keep - sum(len(k) for k in self.kept)
        if room > 0:
            self.kept.append(f[:room].float())

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count < 2:
            raise ValueError(f"FID needs at least 2 images per side, got {self.count}")
        mean = self.sum / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean, cov

    def features(self) -> torch.Tensor:
        return torch.cat(self.kept) if self.kept else torch.empty(0, len(self.sum))


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2); the trace of the square root is the sum of the square roots
    of the eigenvalues of S1 S2 (real and >= 0 for covariance matrices, up to rounding)."""
    mu1, mu2, sigma1, sigma2 = (t.to(torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    eig = torch.linalg.eigvals(sigma1 @ sigma2).real.clamp(min=0)
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * eig.sqrt().sum())


def _kth_neighbour_radii(features: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance of each feature to its k-th nearest other feature of the same set."""
    radii = []
    for start in range(0, len(features), chunk):
        d = torch.cdist(features[start:start + chunk], features)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the 1st is the point itself (distance 0)
    return torch.cat(radii)


def _covered(queries: torch.Tensor, anchors: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Whether each query lies within the radius of at least one anchor."""
    hits = []
    for start in range(0, len(queries), chunk):
        d = torch.cdist(queries[start:start + chunk], anchors)
        hits.append((d <= radii[None]).any(dim=1))
    return torch.cat(hits)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision = share of generated samples inside the
    real manifold (the union of balls reaching each real feature's k-th nearest real neighbour), recall = share of
    real samples inside the generated manifold."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} features per side "
                         f"(got {len(real)} real, {len(fake)} generated)")
    real, fake = real.float(), fake.float()
    precision = _covered(fake, real, _kth_neighbour_radii(real, k)).float().mean().item()
    recall = _covered(real, fake, _kth_neighbour_radii(fake, k)).float().mean().item()
    return precision, recall


@dataclass
class ReferenceStats:
    mean: torch.Tensor
    cov: torch.Tensor
    features: torch.Tensor               # up to `keep` real features, for precision/recall
    count: int
    source: dict[str, Any] = field(default_factory=dict)   # extractor, reference, resolution, limit
    captions: list[str] = field(default_factory=list)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps({"format": FORMAT, "count": self.count, "source": self.source,
                             "captions": self.captions})
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"mean": self.mean, "cov": self.cov, "features": self.features,
                    "header": torch.frombuffer(bytearray(header.encode()), dtype=torch.uint8)}, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            header = json.loads(bytes(state["header"].tolist()).decode())
        except (RuntimeError, KeyError, ValueError, OSError, pickle.UnpicklingError) as err:
            raise ValueError(f"{path}: not a reference statistics file ({err}); delete it or pass another --stats "
                             "path to compute it anew") from err
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
        return cls(state["mean"], state["cov"], state["features"], header["count"], header["source"],
                   header["captions"])


def compute_reference(batches: Iterable[dict], extractor: nn.Module, limit: int | None, keep: int,
                      source: dict[str, Any], device: torch.device | str = "cpu") -> ReferenceStats:
    """Features of up to ``limit`` real images (batches with ``image`` in [-1, 1]; all when None)."""
    moments, captions, count = None, [], 0
    start = time.perf_counter()
    for batch in batches:
        take = len(batch["image"]) if limit is None else min(len(batch["image"]), limit - count)
        images = ((batch["image"][:take].float() + 1) / 2).clamp(0, 1).to(device)
        with torch.no_grad():
            feats = extractor(images)
        moments = moments or FeatureMoments(feats.shape[1], keep)
        moments.update(feats)
        captions += list(batch.get("caption", [""] * take))[:take]
        count += take
        if limit is not None and count >= limit:
            break
    if moments is None:
        raise ValueError(f"reference {source.get('reference')}: no images")
    log.info("reference statistics: %d images in %.0f s (%s)", moments.count, time.perf_counter() - start,
             source.get("extractor"))
    mean, cov = moments.mean_cov()
    return ReferenceStats(mean, cov, moments.features(), moments.count, source, captions)


def reference_stats(path: str | Path, source: dict[str, Any], compute) -> ReferenceStats:
    """The cached statistics at ``path`` when they were computed from ``source``; else ``compute()``, saved there.
    A file computed from something else is an error naming what differs (the cache is never silently reused)."""
    path = Path(path)
    if path.is_file():
        stats = ReferenceStats.load(path)
        differs = {k: (stats.source.get(k), v) for k, v in source.items() if stats.source.get(k) != v}
        if differs:
            detail = "; ".join(f"{k}: file {a!r}, asked {b!r}" for k, (a, b) in differs.items())
            raise ValueError(f"{path} holds reference statistics of something else ({detail}); pass another "
                             "--stats path, or delete it to compute it anew")
        log.info("reference statistics: %s (%d images, cached)", path, stats.count)
        return stats
    stats = compute()
    stats.save(path)
    log.info("reference statistics written to %s", path)
    return stats


def balanced_conditions(pipe: LatentDiffusionPipeline, n: int, captions: list[str]) -> Conditions:
    """What to generate ``n`` samples for: class labels balanced over the model's classes (n / classes each, in
    order), captions of the reference set (cycled) for a text-conditional model."""
    embedders = {e.input_key: e for e in pipe.conditioner.embedders}
    if "class_label" in embedders:
        classes = embedders["class_label"].num_classes
        labels = [i * classes // n for i in range(n)]
        return Conditions([""] * n, labels)
    if not captions:
        raise ValueError("the reference set has no captions to condition a text-to-image model on")
    return Conditions([captions[i % len(captions)] for i in range(n)], [0] * n)


def evaluate(pipe: LatentDiffusionPipeline, stats: ReferenceStats, extractor: nn.Module, num_samples: int, *,
             sampling: dict[str, Any], batch_size: int = 100, keep: int = 10_000, k: int = 3,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """FID of ``num_samples`` samples against ``stats``, with precision/recall on up to ``keep`` features a side.
    Sample i is generated from seed ``sampling['seed'] + i`` whatever the chunking."""
    conditions = balanced_conditions(pipe, num_samples, stats.captions)
    moments = FeatureMoments(len(stats.mean), keep)
    seed = int(sampling.get("seed", 0))
    start = time.perf_counter()
    for first in range(0, num_samples, batch_size):
        idx = range(first, min(num_samples, first + batch_size))
        images = generate(pipe, conditions.take(idx), **(sampling | {"seed": seed + first}), batch_size=batch_size)
        with torch.no_grad():
            moments.update(extractor(images.to(device)))
        log.info("%d / %d samples (%.0f s)", moments.count, num_samples, time.perf_counter() - start)
    mean, cov = moments.mean_cov()
    out = {"fid": frechet_distance(mean, cov, stats.mean, stats.cov), "num_samples": moments.count,
           "reference_images": stats.count, "seconds": round(time.perf_counter() - start, 1)}
    if keep > k and len(stats.features) > k:
        out["precision"], out["recall"] = precision_recall(stats.features, moments.features(), k)
    return out
