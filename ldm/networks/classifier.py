"""A small Fashion-MNIST classifier, used offline as an evaluator (label agreement, class accuracy)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FashionClassifier(nn.Module):
    """Images in [-1, 1] (any size, RGB or grey) -> 10 logits; works at 28x28 internally.

    ``features(x)`` returns the 128-d penultimate activations, usable as an FID feature space.
    """

    def __init__(self, num_classes: int = 10, width: int = 32, input_size: int = 28):
        super().__init__()
        self.input_size = input_size
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * w * (input_size // 4) ** 2, 128), nn.ReLU(inplace=True), nn.Dropout(0.3),
        )
        self.head = nn.Linear(128, num_classes)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="area")
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self._prepare(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
