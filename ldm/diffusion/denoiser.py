"""The denoiser every sampler calls: a network's output (eps, v or x0 prediction) -> the estimate of x0.

With alpha = sqrt(abar), sigma = sqrt(1 - abar) and x = alpha x0 + sigma eps (Karras et al. 2022 write the same
as D(x) = c_skip x + c_out F(x)):
  eps prediction: D = (x - sigma eps) / alpha   (undefined at abar = 0)
  v prediction:   D = alpha x - sigma v        (Salimans & Ho 2022; finite everywhere)
  x0 prediction:  D = F
Classifier-free guidance (Ho & Salimans 2022) combines the two halves' raw outputs, f_u + scale (f_c - f_u), in one
batched forward, then converts: D is affine in the output at a given x, so this equals guiding D itself. Guidance
runs only at the levels of ``interval`` (elsewhere the conditional half alone), and ``rescale`` applies CFG rescale
to the guided output (``ldm.diffusion.guidance``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm.diffusion.guidance import Condition, Interval, cfg, check_interval, check_rescale, guides_at
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


class Denoiser:
    """``denoiser(x, t, abar) -> D``, the x0 estimate at network timestep ``t`` and noise level ``abar``.

    Args:
        network: ``network(x, t, condition) -> output`` (t a (B,) tensor).
        prediction: what the network predicts: ``eps``, ``v`` or ``x0``.
        schedule: the training schedule (eps prediction on a zero-terminal-SNR schedule is refused here).
        cond, uncond, scale: conditions for the guided halves; ``uncond=None`` or ``scale=1`` runs one pass.
        interval: [sigma_lo, sigma_hi]: guidance only where sqrt((1 - abar) / abar) lies in (lo, hi]; None: always.
        rescale: CFG rescale's phi (0: off).
    """

    def __init__(self, network: Network, prediction: str, schedule: NoiseSchedule, cond: Condition | None = None,
                 uncond: Condition | None = None, scale: float = 1.0, interval: Interval | None = None,
                 rescale: float = 0.0):
        self.network = network
        self.prediction = check_prediction_for(prediction, schedule)
        self.cond = cond or {}
        self.uncond = uncond
        self.scale = scale
        self.interval = check_interval(interval)
        self.rescale = check_rescale(rescale)

    def to_denoised(self, x: torch.Tensor, out: torch.Tensor, abar: float) -> torch.Tensor:
        alpha, sigma = abar**0.5, (1 - abar) ** 0.5
        if self.prediction == "eps":
            return x0_from_eps(x, out, alpha, sigma)
        return x0_from_v(x, out, alpha, sigma) if self.prediction == "v" else out

    def __call__(self, x: torch.Tensor, t: int, abar: float) -> torch.Tensor:
        tvec = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        uncond = self.uncond if guides_at(abar, self.interval) else None  # outside the interval: f_c alone
        out = cfg(self.network, self.cond, uncond, self.scale, self.rescale)(x, tvec)
        return self.to_denoised(x, out, abar)
