"""CLIP score of generated samples against the prompts they were generated from, while training."""

from __future__ import annotations

import lightning as L
import torch

from ldm.callbacks.sample_metrics import SampleMetricCallback
from ldm.evaluation.clip_score import CLIPScore
from ldm.evaluation.samples import Conditions, score_samples


class CLIPScoreCallback(SampleMetricCallback):
    """Mean 100·max(cos, 0) between each sample and its caption, with an open_clip model.

    ``pretrained`` is an open_clip tag (downloaded) or a local weights file. Logged as
    ``eval/clip_score``; the log line names the CLIP model that produced it.
    """

    def __init__(self, arch: str = "ViT-B-32", pretrained: str | None = "laion2b_s34b_b79k", **kwargs):
        super().__init__(**kwargs)
        self.arch = arch
        self.pretrained = pretrained
        self.metric: CLIPScore | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.metric is None:
            self.metric = CLIPScore(self.arch, self.pretrained)
        self.metric.to(pl_module.device)

    def describe(self) -> str:
        return f"CLIP model: {self.metric.description}"

    def evaluate(self, images: torch.Tensor, conditions: Conditions) -> dict[str, float]:
        scores = score_samples(images, conditions, clip=self.metric, batch_size=self.batch_size)
        return {"eval/clip_score": scores["clip_score"]}
