"""Transformer blocks over feature maps: self-attention, cross-attention to a context, GEGLU feed-forward.

Names follow the CompVis/Stable Diffusion layout (``transformer_blocks.{i}.attn1.to_q`` ...) so that
foreign checkpoints map onto it. Attention runs on ``ldm.networks.sdpa.attention`` (SDPA or, for short
bf16 sequences on a CPU, the faster explicit product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.networks.autoencoder import group_norm
from ldm.networks.sdpa import attention


class CrossAttention(nn.Module):
    """Multi-head attention from ``x`` (B, N, query_dim) to ``context`` (B, M, context_dim), or to itself."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        # One matmul for the projections that share an input (q, k, v of self-attention; k, v of
        # cross-attention): fewer, larger GEMMs. The weights stay separate parameters (checkpoint layout).
        if context is None:
            q, k, v = F.linear(x, torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])).chunk(3, -1)
        else:
            q = self.to_q(x)
            k, v = F.linear(context, torch.cat([self.to_k.weight, self.to_v.weight])).chunk(2, -1)
        q, k, v = (a.view(b, -1, self.heads, a.shape[-1] // self.heads).transpose(1, 2) for a in (q, k, v))
        out = attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): x W * GELU(x V)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map (B, C, H, W) -> tokens -> ``depth`` transformer blocks -> feature map, residual.

    The output projection starts at zero, so a fresh block is the identity.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int = 1, context_dim: int | None = None,
                 dropout: float = 0.0, use_linear: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = group_norm(channels)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        hidden = self.norm(x)
        if not self.use_linear:
            hidden = self.proj_in(hidden)
        hidden = hidden.flatten(2).transpose(1, 2)
        if self.use_linear:
            hidden = self.proj_in(hidden)
        for block in self.transformer_blocks:
            hidden = block(hidden, context)
        if self.use_linear:
            hidden = self.proj_out(hidden)
        hidden = hidden.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            hidden = self.proj_out(hidden)
        return x + hidden
