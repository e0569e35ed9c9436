"""FID of generated samples against the reference (validation) images, measured while training.

The feature space is configurable: ``inception`` (torch-fidelity's FID InceptionV3, the number
papers report; weights from its cache or a local file) or ``classifier`` (the Fashion-MNIST
classifier of ``scripts/train_classifier.py``, which makes FID meaningful offline). The metric key
names the extractor (``eval/fid_inception``, ``eval/fid_classifier``): the two are not comparable.
"""

from __future__ import annotations

import lightning as L
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from ldm.callbacks.sample_metrics import SampleMetricCallback
from ldm.evaluation.features import build_extractor
from ldm.evaluation.samples import Conditions, score_samples


class FID(SampleMetricCallback):
    """Fréchet distance (Heusel et al. 2017, eq. 6) between Gaussian fits of reference and sample features.

    Reference statistics are computed once, on the first evaluation, and kept
    (``reset_real_features=False``); only the sample statistics are reset between evaluations.
    """

    def __init__(self, extractor: str = "classifier", weights: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.extractor_name = extractor
        self.weights = weights
        self.metric: FrechetInceptionDistance | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.metric is None:  # built before the first step, so a missing weights file fails early
            extractor = build_extractor(self.extractor_name, self.weights)
            self.description = extractor.description
            self.metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False, normalize=True)
        self.metric.to(pl_module.device)

    def describe(self) -> str:
        return f"FID extractor: {self.description}"

    def reference_fid(self) -> FrechetInceptionDistance:
        return self.metric

    def evaluate(self, images: torch.Tensor, conditions: Conditions) -> dict[str, float]:
        # reset() after compute clears the sample statistics only: the reference ones are kept.
        scores = score_samples(images, conditions, fid=self.metric, batch_size=self.batch_size)
        return {f"eval/fid_{self.extractor_name}": scores["fid"]}
