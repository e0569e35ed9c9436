"""Judging generated samples with the offline Fashion-MNIST classifier."""

from __future__ import annotations

import torch
from torch import nn

from ldm.data.fashion_mnist import CLASS_NAMES, caption_for
from ldm.pipeline import LatentDiffusionPipeline


@torch.no_grad()
def class_accuracy(pipe: LatentDiffusionPipeline, classifier: nn.Module, per_class: int = 100,
                   cfg_scale: float = 4.0, sampler: str = "dpmpp_2m", steps: int = 20, seed: int = 0,
                   batch_size: int = 100) -> dict[str, float]:
    """Generate ``per_class`` samples for each class prompt ("a photo of a sneaker", ...) — or class
    label, for class-conditional models — and report the fraction the classifier assigns to that class.
    """
    text = "caption" in pipe.conditioner.input_keys
    labels = list(range(len(CLASS_NAMES)))
    images = pipe(prompt=[caption_for(c) for c in labels] if text else None,
                  class_labels=None if text else labels, num_images=per_class, cfg_scale=cfg_scale,
                  sampler=sampler, steps=steps, seed=seed, batch_size=batch_size, output_type="tensor")
    target = torch.tensor(labels).repeat_interleave(per_class)
    pred = torch.cat([classifier(images[i:i + 500].float().cpu()).argmax(1) for i in range(0, len(images), 500)])
    correct = pred == target
    out = {"accuracy": correct.float().mean().item()}
    for c, name in enumerate(CLASS_NAMES):
        out[name] = correct[target == c].float().mean().item()
    return out
