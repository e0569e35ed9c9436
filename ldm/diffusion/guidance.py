"""Classifier-free guidance (Ho & Salimans 2022), limited to an interval of noise levels and optionally rescaled.

- guidance: f = f_u + s (f_c - f_u), both halves in one batched forward;
- guidance interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves sample and
  distribution quality in diffusion models", their w(sigma)): the guided f only where the noise level sigma lies in
  (sigma_lo, sigma_hi], the conditional f_c alone elsewhere, so those steps run without the unconditional half of
  the batch. sigma is Karras et al.'s (2022) noise level of the variance-exploding form, sigma = sqrt((1 - abar) /
  abar): the same number for every schedule at the same signal-to-noise ratio (SNR = 1 / sigma^2);
- CFG rescale (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", eq. 15-16):
  f_rescaled = f * std(f_c) / std(f) per sample, f_final = phi f_rescaled + (1 - phi) f, which pulls the guided
  output's spread back to the conditional one's (high scales over-expose otherwise). It acts on the network's raw
  output (eps or v), as the paper's implementation and diffusers' ``guidance_rescale`` do;
- autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself", eq. 2): the
  conditional estimate pushed away from a weaker guide model's estimate of the same condition,
  D_w = D_g + w (D_c - D_g) = D_c + (w - 1)(D_c - D_g), added here to the (classifier-free) guided D. The guide is
  a smaller, shorter-trained model of the same latents (``experiment=ldm_f8_guide``); combined in x0 space, so the
  guide may predict eps, v or x0 independently of the main model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

# The defaults of sample.py, the pipeline, the training-time grids and make demo: chosen by the guidance sweep on a
# demo export (benchmarks/results/guidance_sweep/after.md): at cfg 5 with guidance in (0.5, 3], the samples' FID
# fell from 44.7 (cfg 4 at every step, the former default) to 27.3 with class accuracy 97.0% (was 98.2%).
DEFAULT_CFG_SCALE = 5.0
DEFAULT_INTERVAL = (0.5, 3.0)
# A model exported with its guide (``<export>/guide``, trained by experiment=ldm_f8_guide; make demo trains one where
# the machine gives the model enough steps beside it) samples by default with autoguidance 2.5 and cfg 3.5, in the
# same interval: on the same export and evaluation, 96.0% at FID 15.78 (benchmarks/results/guidance_sweep/guide48.md),
# where cfg alone at best reached FID 16.04 at 90.4%.
GUIDED_CFG_SCALE = 3.5
DEFAULT_AUTOGUIDANCE = 2.5


def default_guidance(has_guide: bool, cfg_scale: float | None = None,
                     autoguidance: float | None = None) -> tuple[float, float]:
    """(cfg scale, autoguidance weight): the given ones, or the defaults for a model with or without a guide."""
    cfg = (GUIDED_CFG_SCALE if has_guide else DEFAULT_CFG_SCALE) if cfg_scale is None else cfg_scale
    w = (DEFAULT_AUTOGUIDANCE if has_guide else 1.0) if autoguidance is None else autoguidance
    return cfg, w

Condition = dict[str, torch.Tensor | None]
ConditionalFn = Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]
Interval = tuple[float, float]


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise ValueError("conditional and unconditional inputs must carry the same keys")
    return torch.cat([a, b])


def karras_sigma(abar: float) -> float:
    """sqrt((1 - abar) / abar): the noise level of x / sqrt(abar) (inf at abar = 0, pure noise)."""
    return math.inf if abar <= 0 else math.sqrt((1.0 - abar) / abar)


def check_interval(interval: Sequence[float] | None, key: str = "guidance_interval") -> Interval | None:
    """None (guidance at every step) or [sigma_lo, sigma_hi] with 0 <= lo < hi (hi may be inf)."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={interval!r}: expected null or [sigma_lo, sigma_hi], e.g. [0.3, 5.0]") from None
    if not 0.0 <= lo < hi:
        raise ValueError(f"{key}=[{lo:g}, {hi:g}]: expected 0 <= sigma_lo < sigma_hi (sigma = sqrt((1-abar)/abar); "
                         "inf for no upper bound)")
    return lo, hi


def check_rescale(phi: float, key: str = "guidance_rescale") -> float:
    if not isinstance(phi, int | float) or not 0.0 <= phi <= 1.0:
        raise ValueError(f"{key}={phi!r}: expected a number in [0, 1] (0: off; Lin et al. use 0.7)")
    return float(phi)


def guides_at(abar: float, interval: Interval | None) -> bool:
    """Whether guidance applies at noise level ``abar``: sigma in (lo, hi], or always without an interval."""
    if interval is None:
        return True
    sigma = karras_sigma(abar)
    return interval[0] < sigma <= interval[1]


def rescale(guided: torch.Tensor, conditional: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. eq. 15-16: phi (guided std(conditional) / std(guided)) + (1 - phi) guided, std per sample."""
    if phi == 0.0:
        return guided
    dims = list(range(1, guided.ndim))
    ratio = conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return phi * guided * ratio + (1.0 - phi) * guided


def combine(f_u: torch.Tensor, f_c: torch.Tensor, scale: float, phi: float = 0.0) -> torch.Tensor:
    """The guided output from both halves' outputs (rescaled when ``phi`` > 0)."""
    return rescale(f_u + scale * (f_c - f_u), f_c, phi)


def check_autoguidance(scale: float, key: str = "autoguidance") -> float:
    if not isinstance(scale, int | float) or isinstance(scale, bool) or not 1.0 <= scale <= 20.0:
        raise ValueError(f"{key}={scale!r}: expected a number in [1, 20] (1: off; the sweep's choice with the "
                         "ldm_f8_guide model: 2.5)")
    return float(scale)


def autoguide(denoised: torch.Tensor, d_cond: torch.Tensor, d_guide: torch.Tensor, scale: float) -> torch.Tensor:
    """Karras et al. 2024 eq. 2 added to ``denoised``: + (w - 1)(D_c - D_guide); ``denoised`` = D_c gives theirs."""
    return denoised + (scale - 1.0) * (d_cond - d_guide)


def guided_halves(fn: ConditionalFn, cond: Condition, uncond: Condition | None, scale: float, phi: float,
                  x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_c, f): the conditional output and the guided one (f = f_c without ``uncond`` or at scale 1)."""
    if uncond is None or scale == 1.0:
        f_c = fn(x, t, cond)
        return f_c, f_c
    both = {k: _cat(uncond.get(k), cond.get(k)) for k in cond.keys() | uncond.keys()}
    f_u, f_c = fn(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return f_c, combine(f_u, f_c, scale, phi)


def cfg(fn: ConditionalFn, cond: Condition, uncond: Condition | None, scale: float, phi: float = 0.0
        ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x_t, t) -> f`` guided with ``scale``, for any ``fn(x, t, condition)`` returning the network's raw output.

    ``cond``/``uncond`` are condition dicts (``context``, ``y``) for the batch. A negative prompt is simply its
    condition passed as ``uncond``. Scale 1 (or no ``uncond``) runs the conditional pass alone.
    """
    return lambda x, t: guided_halves(fn, cond, uncond, scale, phi, x, t)[1]
