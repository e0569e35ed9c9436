"""KL-regularised convolutional autoencoder (the first stage of latent diffusion).

Module names follow the layout of the CompVis/Stable Diffusion first stage
(``encoder.down.{i}.block.{j}``, ``mid.attn_1``, ``quant_conv`` ...) so that foreign
checkpoints map onto it key for key. The downsampling factor is ``f = 2 ** (len(ch_mult) - 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.networks.resample import upsample_conv3x3
from ldm.networks.sdpa import attention
from ldm.utils.checks import require_int


def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with at most ``groups`` groups that still divides ``channels``.

    eps follows CompVis: 1e-6 in the autoencoder and the spatial transformer, 1e-5 (PyTorch's default,
    their GroupNorm32) in the U-Net's residual blocks and output — so their checkpoints compute the same here.
    """
    groups = min(groups, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=eps, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, conv) twice, 1x1 shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all positions (1x1 conv projections, ldm.networks.sdpa).

    The 1x1 convolutions run as one matmul over the positions' tokens (q, k and v from one product), so
    attention gets contiguous (B, 1, HW, C) inputs — what the fused SDPA kernels take — and the block
    dispatches a handful of operators; the parameters keep the CompVis layout (``q.weight`` is (C, C, 1, 1)).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight]).flatten(1)
        bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        q, k, v = F.linear(tokens, weight, bias).unsqueeze(1).chunk(3, dim=-1)  # (B, 1, HW, C) each
        out = F.linear(attention(q, k, v).squeeze(1), self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution with right/bottom padding, halving even resolutions exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 convolution (run as four 2x2 convolutions: ldm.networks.resample)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_conv3x3(x, self.conv.weight, self.conv.bias)


class _Level(nn.Module):
    """One resolution level: residual blocks, optional attention after each, optional resampler."""

    def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock], resample: nn.Module | None,
                 resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if resample is not None:
            self.add_module(resample_name, resample)
        self.resample_name = resample_name if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        if self.resample_name is not None:
            x = getattr(self, self.resample_name)(x)
        return x


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, use_attn: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels) if use_attn else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image -> moments of the latent posterior (``2 * z_channels`` maps when ``double_z``)."""

    def __init__(self, *, in_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (), resolution: int = 256,
                 z_channels: int = 4, double_z: bool = True, dropout: float = 0.0, mid_attn: bool = True):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        levels, block_in, res = [], ch, resolution
        mults = (1, *ch_mult)
        for i, mult in enumerate(ch_mult):
            block_in, block_out = ch * mults[i], ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            last = i == len(ch_mult) - 1
            levels.append(_Level(blocks, attns, None if last else Downsample(block_in), "downsample"))
            if not last:
                res //= 2
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(block_in, dropout, mid_attn)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``z_channels`` maps -> image; mirrors :class:`Encoder` with one extra block per level."""

    def __init__(self, *, out_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (), resolution: int = 256,
                 z_channels: int = 4, dropout: float = 0.0, mid_attn: bool = True):
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout, mid_attn)
        levels: list[_Level] = []
        for i in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            first = i == 0
            levels.insert(0, _Level(blocks, attns, None if first else Upsample(block_in), "upsample"))
            if not first:
                res *= 2
        # Stored lowest-resolution-last (as the encoder's), run in reverse.
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final convolution, where the adaptive GAN weight compares gradient norms."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x) parameterised by concatenated (mean, log-variance) maps."""

    def __init__(self, moments: torch.Tensor, logvar_range: tuple[float, float] = (-30.0, 20.0)):
        self.mean, logvar = moments.chunk(2, dim=1)
        # Clamping keeps exp() finite in bf16/fp16 and the KL bounded early in training.
        self.logvar = logvar.clamp(*logvar_range)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw ``mean + std * eps`` (differentiable in mean and std)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dims: 0.5 * sum(mu^2 + var - 1 - log var)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of ``x`` under the posterior, per sample (nats)."""
        log_two_pi = torch.log(torch.tensor(2.0 * torch.pi, dtype=x.dtype, device=x.device))
        return 0.5 * torch.sum(log_two_pi + self.logvar + (x - self.mean).pow(2) / self.var, dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """Encoder -> diagonal Gaussian over ``embed_dim`` latent channels -> decoder.

    ``latent_mean``/``latent_std`` hold the per-channel statistics of the latents measured on
    training data at export (zeros/ones until then); stage 2 normalises with them.
    """

    def __init__(self, *, in_channels: int = 3, out_channels: int = 3, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (), resolution: int = 256, z_channels: int = 4,
                 embed_dim: int = 4, dropout: float = 0.0, mid_attn: bool = True):
        super().__init__()
        ch_mult = tuple(ch_mult)
        attn_resolutions = tuple(attn_resolutions)
        if not ch_mult or any(m < 1 for m in ch_mult):
            raise ValueError(f"model.autoencoder.ch_mult={list(ch_mult)}: expected a non-empty list of positive "
                             "multipliers (f = 2 ** (len(ch_mult) - 1))")
        for name, value, least in (("ch", ch, 1), ("z_channels", z_channels, 1), ("embed_dim", embed_dim, 1),
                                   ("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                   ("num_res_blocks", num_res_blocks, 0), ("resolution", resolution, 1)):
            require_int(f"model.autoencoder.{name}", value, least)
        f = 2 ** (len(ch_mult) - 1)
        if resolution % f:
            raise ValueError(f"resolution={resolution} is not divisible by the downsampling factor f={f} "
                             f"(ch_mult={list(ch_mult)})")
        common = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                      resolution=resolution, z_channels=z_channels, dropout=dropout, mid_attn=mid_attn)
        self.encoder = Encoder(in_channels=in_channels, double_z=True, **common)
        self.decoder = Decoder(out_channels=out_channels, **common)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        self.downsampling_factor = f
        self.resolution = resolution
        # The constructor arguments, for converting to other formats (ldm.interop).
        self.arch = dict(in_channels=in_channels, out_channels=out_channels, embed_dim=embed_dim,
                         **common | {"ch_mult": list(ch_mult), "attn_resolutions": list(attn_resolutions)})
        self.register_buffer("latent_mean", torch.zeros(embed_dim))
        self.register_buffer("latent_std", torch.ones(embed_dim))

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior's (mean, log-variance) maps, concatenated on the channel axis."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _norm_stats(self, mode: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if mode == "channel":
            mean, std = self.latent_mean, self.latent_std
        elif mode == "global":
            # Pooled over channels (equal counts): var = mean_c(std_c^2 + mean_c^2) - mean_c(mean_c)^2.
            m = self.latent_mean.mean()
            std = ((self.latent_std**2 + self.latent_mean**2).mean() - m**2).clamp_min(1e-12).sqrt()
            mean, std = torch.zeros_like(self.latent_mean), std.expand_as(self.latent_std)
        elif mode == "none":
            mean, std = torch.zeros_like(self.latent_mean), torch.ones_like(self.latent_std)
        else:
            raise ValueError(f"unknown latent normalisation '{mode}'; expected channel, global or none")
        shape = (1, -1, 1, 1)
        return mean.view(shape).to(like), std.view(shape).to(like)

    def normalize_latents(self, z: torch.Tensor, mode: str = "channel") -> torch.Tensor:
        """Latents -> roughly unit-variance diffusion space: per channel ``(z - mean_c)/std_c`` or, for
        ``global``, ``z / std`` (Stable Diffusion's scale factor); statistics measured at export."""
        mean, std = self._norm_stats(mode, z)
        return (z - mean) / std

    def denormalize_latents(self, z: torch.Tensor, mode: str = "channel") -> torch.Tensor:
        mean, std = self._norm_stats(mode, z)
        return z * std + mean

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        side = (resolution or self.resolution) // self.downsampling_factor
        return (self.embed_dim, side, side)
