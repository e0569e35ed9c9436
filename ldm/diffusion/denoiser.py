"""The denoiser every sampler calls: a network's output (eps, v or x0 prediction) -> the estimate of x0.

With alpha = sqrt(abar), sigma = sqrt(1 - abar) and x = alpha x0 + sigma eps (Karras et al. 2022 write the same
as D(x) = c_skip x + c_out F(x)):
  eps prediction: D = (x - sigma eps) / alpha   (undefined at abar = 0)
  v prediction:   D = alpha x - sigma v        (Salimans & Ho 2022; finite everywhere)
  x0 prediction:  D = F
Classifier-free guidance (Ho & Salimans 2022) combines the two halves' raw outputs, f_u + scale (f_c - f_u), in one
batched forward, then converts: D is affine in the output at a given x, so this equals guiding D itself. Guidance
runs only at the levels of ``interval`` (elsewhere the conditional half alone), and ``rescale`` applies CFG rescale
to the guided output (``ldm.diffusion.guidance``). An ``AutoGuide`` adds autoguidance: the estimate is pushed away
from a weaker guide model's estimate of the same condition (every step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ldm.diffusion.guidance import (
    Condition,
    Interval,
    autoguide,
    check_autoguidance,
    check_interval,
    check_rescale,
    guided_halves,
    guides_at,
)
from ldm.diffusion.objectives import check_prediction, x0_from_eps, x0_from_v
from ldm.diffusion.schedule import NoiseSchedule

Network = Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]


def check_prediction_for(prediction: str, schedule: NoiseSchedule) -> str:
    """Refuse eps prediction on a schedule that reaches abar = 0 (zero terminal SNR): x0 is undefined there."""
    check_prediction(prediction)
    if prediction == "eps" and float(schedule.alphas_cumprod[-1]) == 0.0:
        raise ValueError("prediction=eps with a zero-terminal-SNR schedule (abar_T = 0): x0 = (x - eps)/sqrt(abar) is "
                         "undefined at the first sampling step; use model.prediction=v (or x0), or "
                         "model.schedule.zero_terminal_snr=false")
    return prediction


def denoised(prediction: str, x: torch.Tensor, out: torch.Tensor, abar: float) -> torch.Tensor:
    """The x0 estimate from a network's raw ``out`` at noise level ``abar``, for its ``prediction``."""
    alpha, sigma = abar**0.5, (1 - abar) ** 0.5
    if prediction == "eps":
        return x0_from_eps(x, out, alpha, sigma)
    return x0_from_v(x, out, alpha, sigma) if prediction == "v" else out


@dataclass
class AutoGuide:
    """The guide of autoguidance: its network, what it predicts, its own encoding of the batch's condition, and the
    weight w (1: off). It must share the main model's latents and noise schedule (the pipeline checks)."""

    network: Network
    prediction: str
    cond: Condition
    scale: float


class Denoiser:
    """``denoiser(x, t, abar) -> D``, the x0 estimate at network timestep ``t`` and noise level ``abar``.

    Args:
        network: ``network(x, t, condition) -> output`` (t a (B,) tensor).
        prediction: what the network predicts: ``eps``, ``v`` or ``x0``.
        schedule: the training schedule (eps prediction on a zero-terminal-SNR schedule is refused here).
        cond, uncond, scale: conditions for the guided halves; ``uncond=None`` or ``scale=1`` runs one pass.
        interval: [sigma_lo, sigma_hi]: guidance only where sqrt((1 - abar) / abar) lies in (lo, hi]; None: always.
        rescale: CFG rescale's phi (0: off).
        guide: autoguidance's guide model (None: off).
    """

    def __init__(self, network: Network, prediction: str, schedule: NoiseSchedule, cond: Condition | None = None,
                 uncond: Condition | None = None, scale: float = 1.0, interval: Interval | None = None,
                 rescale: float = 0.0, guide: AutoGuide | None = None):
        self.network = network
        self.prediction = check_prediction_for(prediction, schedule)
        self.cond = cond or {}
        self.uncond = uncond
        self.scale = scale
        self.interval = check_interval(interval)
        self.rescale = check_rescale(rescale)
        if guide is not None:
            check_autoguidance(guide.scale)
            check_prediction_for(guide.prediction, schedule)
        self.guide = guide if guide is not None and guide.scale != 1.0 else None

    def to_denoised(self, x: torch.Tensor, out: torch.Tensor, abar: float) -> torch.Tensor:
        return denoised(self.prediction, x, out, abar)

    def __call__(self, x: torch.Tensor, t: int, abar: float) -> torch.Tensor:
        tvec = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        uncond = self.uncond if guides_at(abar, self.interval) else None  # outside the interval: f_c alone
        f_c, out = guided_halves(self.network, self.cond, uncond, self.scale, self.rescale, x, tvec)
        d = self.to_denoised(x, out, abar)
        if self.guide is None:
            return d
        d_guide = denoised(self.guide.prediction, x, self.guide.network(x, tvec, self.guide.cond), abar)
        return autoguide(d, self.to_denoised(x, f_c, abar), d_guide, self.guide.scale)
