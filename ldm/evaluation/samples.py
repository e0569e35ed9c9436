"""Judging generated samples: FID against reference images, CLIP score, class accuracy."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from ldm.evaluation.clip_score import CLIPScore
from ldm.pipeline import LatentDiffusionPipeline


@dataclass
class Conditions:
    """Captions and class labels to generate for, one entry per sample."""

    captions: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)

    def take(self, indices: Iterable[int]) -> Conditions:
        """The entries at ``indices`` (modulo the length, so a short set is cycled)."""
        idx = [i % len(self) for i in indices]
        return Conditions([self.captions[i] for i in idx], [self.labels[i] for i in idx])


def generate(pipe: LatentDiffusionPipeline, conditions: Conditions, *, sampler: str = "dpmpp_2m", steps: int = 20,
             cfg_scale: float = 4.0, seed: int = 0, batch_size: int = 100, progress: bool = False,
             guidance_interval: Sequence[float] | None = None, guidance_rescale: float = 0.0,
             autoguidance: float = 1.0) -> torch.Tensor:
    """One sample per condition, in [0, 1]; the model gets the inputs it was trained on (text or labels).
    Sample ``i`` starts from the noise of seed ``seed + i``; ``progress`` reports the sampling (bar or log lines).
    Guidance as given (here at every step unless ``guidance_interval`` says otherwise; ``autoguidance`` needs the
    pipeline's guide model): evaluations state it."""
    keys = pipe.conditioner.input_keys
    images = pipe(prompt=conditions.captions if "caption" in keys else None,
                  class_labels=conditions.labels if "class_label" in keys else None, num_images=1, sampler=sampler,
                  steps=steps, cfg_scale=cfg_scale, seed=seed, batch_size=batch_size, output_type="tensor",
                  progress=progress, guidance_interval=guidance_interval, guidance_rescale=guidance_rescale,
                  autoguidance=autoguidance)
    return ((images.float() + 1) / 2).clamp(0, 1)


def read_reference(batches: Iterable[dict], limit: int, fid: FrechetInceptionDistance | None = None) -> Conditions:
    """Up to ``limit`` reference samples: their conditions, and their images into ``fid``'s real statistics."""
    conditions = Conditions()
    for batch in batches:
        take = min(len(batch["caption"]), limit - len(conditions))
        if fid is not None:
            fid.update(((batch["image"][:take].float() + 1) / 2).clamp(0, 1).to(fid.device), real=True)
        conditions.captions += batch["caption"][:take]
        conditions.labels += batch["class_label"][:take].tolist()
        if len(conditions) >= limit:
            break
    if not conditions.captions:
        raise ValueError("read_reference: the reference loader gave no samples")
    return conditions


@torch.no_grad()
def score_samples(images: torch.Tensor, conditions: Conditions, *, fid: FrechetInceptionDistance | None = None,
                  clip: CLIPScore | None = None, classifier: nn.Module | None = None,
                  batch_size: int = 100) -> dict[str, float]:
    """FID (``fid`` must hold the reference statistics; its sample statistics are reset afterwards),
    CLIP score against the captions and the classifier's accuracy against the labels — those given."""
    out: dict[str, float] = {}
    correct = 0
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if fid is not None:
            fid.update(chunk.to(fid.device), real=False)
        if clip is not None:
            clip.update(chunk.to(clip.device), conditions.captions[start:start + batch_size])
        if classifier is not None:
            pred = classifier(chunk.float().cpu() * 2 - 1).argmax(1)
            correct += (pred == torch.tensor(conditions.labels[start:start + batch_size])).sum().item()
    if fid is not None:
        out["fid"] = float(fid.compute())
        fid.reset()
    if clip is not None:
        out["clip_score"] = float(clip.compute())
        clip.reset()
    if classifier is not None:
        out["class_accuracy"] = correct / len(images)
    return out


class SampleJudge:
    """A fixed reference set and the metrics to judge models against it, reusable across models and
    guidance scales: FID (``extractor``'s features; reference statistics computed once), CLIP score
    (``clip``) and class accuracy (``classifier``) — those given."""

    def __init__(self, reference_batches: Iterable[dict], num_samples: int, *, extractor: nn.Module | None = None,
                 clip: CLIPScore | None = None, classifier: nn.Module | None = None):
        self.fid = (FrechetInceptionDistance(feature=extractor, reset_real_features=False, normalize=True)
                    if extractor is not None else None)
        self.extractor_name = getattr(extractor, "name", None)
        self.clip = clip
        self.classifier = classifier
        self.conditions = read_reference(reference_batches, num_samples, self.fid)

    def __call__(self, pipe: LatentDiffusionPipeline, **sampling) -> dict[str, float]:
        """Generate one sample per reference condition (``sampling``: sampler, steps, cfg_scale, seed) and score."""
        images = generate(pipe, self.conditions, **({"progress": True} | sampling))
        scores = score_samples(images, self.conditions, fid=self.fid, clip=self.clip, classifier=self.classifier)
        if "fid" in scores:
            scores[f"fid_{self.extractor_name}"] = scores.pop("fid")
        return scores


def per_class_accuracy(pipe: LatentDiffusionPipeline, classifier: nn.Module, per_class: int = 50, *,
                       sampler: str = "dpmpp_2m", steps: int = 20, cfg_scale: float = 4.0,
                       seed: int = 0, batch_size: int = 100, fid: FrechetInceptionDistance | None = None,
                       guidance_interval: Sequence[float] | None = None,
                       guidance_rescale: float = 0.0, autoguidance: float = 1.0) -> dict[str, float]:
    """``per_class`` samples of each Fashion-MNIST class (its caption or label), judged by ``classifier``: the
    share classified as their class, per class name and overall (``all``). ``fid`` (holding reference
    statistics) also receives the samples. ``autoguidance`` > 1 needs the pipeline's guide."""
    from ldm.data.fashion_mnist import CLASS_NAMES, caption_for

    labels = [c for c in range(len(CLASS_NAMES)) for _ in range(per_class)]
    conditions = Conditions([caption_for(c) for c in labels], labels)
    images = generate(pipe, conditions, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                      batch_size=batch_size, progress=True, guidance_interval=guidance_interval,
                      guidance_rescale=guidance_rescale, autoguidance=autoguidance)
    pred = torch.cat([classifier(images[i:i + batch_size].float().cpu() * 2 - 1).argmax(1)
                      for i in range(0, len(images), batch_size)])
    if fid is not None:
        for i in range(0, len(images), batch_size):
            fid.update(images[i:i + batch_size].to(fid.device), real=False)
    return accuracy_by_class(pred, torch.tensor(labels))


def accuracy_by_class(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Share of ``pred == labels``: overall (``all``), then per Fashion-MNIST class name (classes present)."""
    from ldm.data.fashion_mnist import CLASS_NAMES

    hit = (pred == labels).float()
    per_class = {name: hit[labels == c].mean().item() for c, name in enumerate(CLASS_NAMES) if (labels == c).any()}
    return {"all": hit.mean().item()} | per_class


@torch.no_grad()
def real_accuracy(batches: Iterable[dict], classifier: nn.Module, limit: int) -> dict[str, float]:
    """The classifier's own accuracy on up to ``limit`` real images (batches with ``image`` in [-1, 1]): the
    ceiling its judgement of samples can be read against."""
    preds, labels = [], []
    for batch in batches:
        preds.append(classifier(batch["image"].float()).argmax(1))
        labels.append(batch["class_label"])
        if sum(len(x) for x in labels) >= limit:
            break
    return accuracy_by_class(torch.cat(preds)[:limit], torch.cat(labels)[:limit])
