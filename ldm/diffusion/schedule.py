"""Discrete-time noise schedules: betas -> alphas_cumprod, forward noising, SNR.

Notation: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4), t = 0..T-1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("linear", "scaled_linear", "cosine")


def make_betas(kind: str, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
               cosine_s: float = 0.008) -> torch.Tensor:
    """Betas of a named schedule, float64.

    - ``linear``: betas evenly spaced from ``beta_start`` to ``beta_end`` (DDPM; CompVis calls it "sqrt_linear").
    - ``scaled_linear``: sqrt(betas) evenly spaced, squared (the LDM/Stable Diffusion schedule; CompVis "linear").
    - ``cosine``: abar_t = cos^2(((t/T + s)/(1 + s)) pi/2) (Nichol & Dhariwal 2021, eq. 17), betas clipped at 0.999.
    """
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if kind == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        abar = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        abar = abar / abar[0]
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown noise schedule '{kind}'; expected one of {SCHEDULES}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(abar) so that abar_T = 0 exactly, keeping abar_0 (Lin et al. 2024, Algorithm 1)."""
    sqrt_abar = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


class NoiseSchedule(nn.Module):
    """Holds ``alphas_cumprod`` and the forward process.

    The tables are float64 buffers (not saved in checkpoints: the config rebuilds them) that follow the module
    holding the schedule to its device, so the training step indexes them where ``t`` lives and copies nothing
    from the host; they stay float64 whatever dtype the module is cast to.

    Args:
        kind: ``linear``, ``scaled_linear`` or ``cosine``.
        num_timesteps: T.
        zero_terminal_snr: rescale so that abar_{T-1} = 0 (pair with v-prediction).
    """

    def __init__(self, kind: str = "scaled_linear", num_timesteps: int = 1000, beta_start: float = 0.00085,
                 beta_end: float = 0.012, zero_terminal_snr: bool = False):
        super().__init__()
        betas = make_betas(kind, num_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.kind = kind
        self.num_timesteps = num_timesteps
        self.zero_terminal_snr = zero_terminal_snr
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # Follow the device only: a cast of the holder (bf16-true, .half()) must not round the tables.
        for name, table in self._buffers.items():
            self._buffers[name] = table.to(fn(table).device)
        return self

    def extra_repr(self) -> str:
        return f"{self.kind}, T={self.num_timesteps}, zero_terminal_snr={self.zero_terminal_snr}"

    def _coef(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = values.to(like.device)[t.to(like.device).long()].to(like.dtype)
        return out.view(-1, *([1] * (like.dim() - 1)))

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) broadcastable against ``like``."""
        abar = self._coef(self.alphas_cumprod, t, like)
        return abar.sqrt(), (1 - abar).sqrt()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with the given noise (Ho et al., eq. 4)."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) (float32; infinite where abar_t = 1, 0 where abar_t = 0)."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        return (abar / (1 - abar)).float()
