"""LPIPS perceptual distance (Zhang et al. 2018) through torchmetrics, with offline-aware weight loading.

LPIPS needs ImageNet-pretrained VGG16 weights that torchvision normally downloads. Here they
are looked up in torch's hub cache (or copied there from a configured local file); when
neither exists the error names the exact file expected instead of attempting a download.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

VGG16_FILE = "vgg16-397923af.pth"


def vgg16_cache_path() -> Path:
    """Where torchvision looks for its ImageNet VGG16 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


class PerceptualLoss(nn.Module):
    """Per-sample LPIPS(VGG) between images in [-1, 1]; frozen, in eval mode."""

    def __init__(self, vgg_weights: str | None = None):
        super().__init__()
        target = vgg16_cache_path()
        if vgg_weights is not None:
            source = Path(vgg_weights).expanduser()
            if not source.is_file():
                raise FileNotFoundError(f"perceptual loss: vgg_weights={source} does not exist; "
                                        f"expected torchvision's ImageNet VGG16 weights ({VGG16_FILE}).")
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
        if not target.exists():
            raise FileNotFoundError(
                f"perceptual loss (LPIPS) needs torchvision's ImageNet VGG16 weights at {target}. "
                f"Download {VGG16_FILE} there, pass model.loss.perceptual.vgg_weights=/path/to/{VGG16_FILE}, "
                "or set model.loss.perceptual_weight=0 to train without it."
            )
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.lpips = LearnedPerceptualImagePatchSimilarity(net_type="vgg", reduction="none")
        self.lpips.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips.net(x.clamp(-1, 1), y.clamp(-1, 1)).flatten()
