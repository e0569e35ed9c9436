"""The denoising U-Net: ResBlocks with a timestep embedding, SpatialTransformers at chosen levels.

``UNet(x_t, t, context=None, y=None)`` returns a tensor shaped like ``x_t``. Module names follow
the CompVis ``openaimodel`` layout (``input_blocks``, ``middle_block``, ``output_blocks``,
``time_embed``, ``label_emb``, ``out``) so Stable Diffusion-style checkpoints map onto it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.networks.attention import SpatialTransformer
from ldm.networks.autoencoder import Upsample, group_norm


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t w_i), sin(t w_i)], w_i = max_period^(-i/half) (Vaswani et al. 2017, sec. 3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected timestep embedding, GroupNorm-SiLU-dropout-conv (zero-init)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(group_norm(channels, eps=1e-5), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(group_norm(out_channels, eps=1e-5), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``emb`` is the timestep embedding after its SiLU (``emb_layers[0]``), which the U-Net computes once
        for all blocks rather than once per block."""
        h = self.in_layers(x)
        h = h + self.emb_layers[1](emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class TimestepEmbedSequential(nn.Sequential):
    """Passes the timestep embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """Conditional U-Net of Rombach et al. 2022 (after Dhariwal & Nichol 2021).

    Args:
        attention_resolutions: downsampling factors (1, 2, 4, ...) of the levels that get a SpatialTransformer.
        num_head_channels: width per head (``num_heads`` then follows from the channels); or set ``num_heads``.
        context_dim: width of the cross-attention context (None: attention without cross-attention).
        adm_in_channels: width of a vector condition ``y`` added to the timestep embedding (class embeddings).
        use_checkpoint: gradient checkpointing of every block (less memory, about 30% more compute).
    """

    def __init__(self, *, in_channels: int = 4, out_channels: int | None = None, model_channels: int = 64,
                 num_res_blocks: int = 2, attention_resolutions: Sequence[int] = (2, 4),
                 channel_mult: Sequence[int] = (1, 2, 4), num_heads: int = -1, num_head_channels: int = 32,
                 transformer_depth: int = 1, context_dim: int | None = None, adm_in_channels: int | None = None,
                 dropout: float = 0.0, use_checkpoint: bool = False, use_linear_in_transformer: bool = False):
        super().__init__()
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError("set exactly one of num_heads and num_head_channels")
        if not channel_mult or any(m < 1 for m in channel_mult) or model_channels < 1:
            raise ValueError(f"model.unet.channel_mult={list(channel_mult)} / model_channels={model_channels}: "
                             "expected a non-empty list of positive multipliers and a positive width")
        for level, mult in enumerate(channel_mult):
            width, heads_from = model_channels * mult, num_heads if num_heads != -1 else num_head_channels
            if 2 ** level in attention_resolutions and width < heads_from:
                key = "num_heads" if num_heads != -1 else "num_head_channels"
                raise ValueError(f"model.unet.{key}={heads_from} exceeds the {width} channels of attention level "
                                 f"{level} (model_channels {model_channels} x channel_mult {mult})")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        # The constructor arguments, for converting to other formats (ldm.interop).
        self.arch = dict(in_channels=in_channels, out_channels=self.out_channels, model_channels=model_channels,
                         num_res_blocks=num_res_blocks, attention_resolutions=list(attention_resolutions),
                         channel_mult=list(channel_mult), num_heads=num_heads, num_head_channels=num_head_channels,
                         transformer_depth=transformer_depth, context_dim=context_dim, adm_in_channels=adm_in_channels,
                         use_linear_in_transformer=use_linear_in_transformer)
        self.context_dim = context_dim
        self.adm_in_channels = adm_in_channels
        self.use_checkpoint = use_checkpoint
        self.downsampling = 2 ** (len(channel_mult) - 1)
        emb_dim = model_channels * 4
        self.model_channels = model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if adm_in_channels is not None:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, emb_dim), nn.SiLU(),
                                                         nn.Linear(emb_dim, emb_dim)))

        def transformer(ch: int) -> SpatialTransformer:
            heads = num_heads if num_heads != -1 else ch // num_head_channels
            dim_head = ch // heads
            return SpatialTransformer(ch, heads, dim_head, transformer_depth, context_dim, dropout,
                                      use_linear_in_transformer)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3,
                                                                             padding=1))])
        skip_channels, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * model_channels, dropout)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_dim, dropout=dropout), transformer(ch),
                                                    ResBlock(ch, emb_dim, dropout=dropout))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, model_channels * mult, dropout)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(group_norm(ch, eps=1e-5), nn.SiLU(),
                                 zero_module(nn.Conv2d(model_channels, self.out_channels, 3, padding=1)))

    def _run(self, block: TimestepEmbedSequential, h: torch.Tensor, emb: torch.Tensor,
             context: torch.Tensor | None) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        if (y is not None) != (self.adm_in_channels is not None):
            raise ValueError(f"y must be given exactly when adm_in_channels is set (adm_in_channels="
                             f"{self.adm_in_channels}, y {'given' if y is not None else 'missing'})")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))
        emb = F.silu(emb)  # every ResBlock's emb_layers starts with this SiLU: computed once here
        skips, h = [], x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
