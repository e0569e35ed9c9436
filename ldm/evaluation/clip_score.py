"""CLIP score with an open_clip model: 100 · max(cos(image, prompt), 0), averaged (Hessel et al. 2021)."""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from ldm.checkpoints import read_state_dict


def load_open_clip(arch: str, pretrained: str | None) -> tuple[torch.nn.Module, object]:
    """An open_clip model and its tokenizer; ``pretrained`` is a tag (downloaded by open_clip) or a local file."""
    if open_clip.get_model_config(arch) is None:
        raise ValueError(f"unknown open_clip architecture '{arch}' (see open_clip.list_models())")
    model = open_clip.create_model(arch, pretrained=None)
    if pretrained:
        path = Path(pretrained).expanduser()
        if path.is_file():
            state = read_state_dict(path, "CLIP weights")
            result = model.load_state_dict(state, strict=False)
            if result.missing_keys:
                raise ValueError(f"CLIP weights {path} do not fit open_clip '{arch}': missing "
                                 f"{len(result.missing_keys)} keys, e.g. {result.missing_keys[:5]}")
        elif path.suffix or "/" in pretrained:
            raise FileNotFoundError(f"CLIP weights file {path} does not exist")
        else:
            try:
                model = open_clip.create_model(arch, pretrained=pretrained)
            except Exception as err:  # noqa: BLE001 - network/hub failures of every kind
                raise FileNotFoundError(
                    f"could not load open_clip '{arch}' / '{pretrained}' ({err}). Without internet, download it "
                    "elsewhere and pass the local file as pretrained=/path/to/open_clip_model.safetensors") from err
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(arch)


class CLIPScore(Metric):
    """Mean CLIP score of (image, prompt) pairs; states are sums, so DDP reduces them exactly."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, arch: str = "ViT-B-32", pretrained: str | None = "laion2b_s34b_b79k", **kwargs):
        super().__init__(**kwargs)
        self.model, self.tokenizer = load_open_clip(arch, pretrained)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg["size"]
        self.image_size = tuple(size) if isinstance(size, list | tuple) else (size, size)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.description = f"open_clip {arch} ({pretrained or 'random init'})"
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-pair scores for images in [0, 1] (B, 3, H, W)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        x = F.interpolate(images.float().clamp(0, 1), size=self.image_size, mode="bicubic", align_corners=False)
        x = (x.clamp(0, 1) - self.mean) / self.std
        img = F.normalize(self.model.encode_image(x).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(x.device)).float(), dim=-1)
        return 100 * (img * txt).sum(-1).clamp_min(0)

    def update(self, images: torch.Tensor, prompts: list[str]) -> None:
        s = self.scores(images, prompts)
        self.score_sum += s.double().sum()
        self.count += len(s)

    def compute(self) -> torch.Tensor:
        return (self.score_sum / self.count.clamp_min(1)).float()
