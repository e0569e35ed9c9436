"""Samplers: short loops over ``denoised = denoiser(x, t, abar)`` in the manner of k-diffusion.

Each walks ``NoiseLevels`` from the noisiest level to the clean sample (abar = 1), in the variance-preserving
coordinates the network sees: x = alpha x0 + sigma eps, alpha = sqrt(abar), sigma = sqrt(1 - abar). All are finite
at abar = 0 (zero terminal SNR) given a finite denoised estimate. Hooks:
  ``callback(i, x, denoised)`` after each step (progress bars, previews);
  ``after_step(x, abar_s) -> x`` rewrites the state after each step (inpainting re-imposes the known region
  noised to abar_s).
Randomness comes only from ``generator``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch

from ldm.diffusion.levels import TERMINAL_ABAR, NoiseLevels

Denoise = Callable[[torch.Tensor, int, float], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None] | None
AfterStep = Callable[[torch.Tensor, float], torch.Tensor] | None


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _eps(x: torch.Tensor, denoised: torch.Tensor, abar: float) -> torch.Tensor:
    """The noise implied by the denoised estimate: eps = (x - alpha D) / sigma (sigma > 0 before the end)."""
    return (x - abar**0.5 * denoised) / (1 - abar) ** 0.5


def _check_eta(eta: float) -> None:
    if not eta >= 0:
        raise ValueError(f"eta={eta}: expected >= 0 (0: deterministic, 1: the full ancestral noise)")


def _hooks(i: int, x: torch.Tensor, denoised: torch.Tensor, abar_s: float, callback: Callback,
           after_step: AfterStep) -> torch.Tensor:
    if after_step is not None:
        x = after_step(x, abar_s)
    if callback is not None:
        callback(i, x, denoised)
    return x


@torch.no_grad()
def ddim(denoiser: Denoise, x: torch.Tensor, levels: NoiseLevels, *, eta: float = 0.0,
         generator: torch.Generator | None = None, callback: Callback = None,
         after_step: AfterStep = None) -> torch.Tensor:
    """DDIM (Song et al. 2021); ``eta=0`` deterministic, ``eta=1`` the ancestral DDPM variance."""
    _check_eta(eta)
    for i, (t, a_t, a_s) in enumerate(levels.steps()):
        d = denoiser(x, t, a_t)
        eps = _eps(x, d, a_t)
        std = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) ** 0.5  # eq. 16
        x = a_s**0.5 * d + max(1 - a_s - std**2, 0.0) ** 0.5 * eps  # eq. 12
        if std > 0:
            x = x + std * _randn(x, generator)
        x = _hooks(i, x, d, a_s, callback, after_step)
    return x


@torch.no_grad()
def ddpm(denoiser: Denoise, x: torch.Tensor, levels: NoiseLevels, *, generator: torch.Generator | None = None,
         callback: Callback = None, after_step: AfterStep = None) -> torch.Tensor:
    """Ancestral sampling from the posterior q(x_s | x_t, D) (Ho et al. 2020, eqs. 6-7) over any sub-sequence."""
    for i, (t, a_t, a_s) in enumerate(levels.steps()):
        d = denoiser(x, t, a_t)
        alpha, beta = a_t / a_s, 1 - a_t / a_s  # one step's alpha and beta between the two levels
        x = a_s**0.5 * beta / (1 - a_t) * d + alpha**0.5 * (1 - a_s) / (1 - a_t) * x  # eq. 7, posterior mean
        var = (1 - a_s) / (1 - a_t) * beta  # eq. 7, posterior variance ("fixed small")
        if var > 0:
            x = x + var**0.5 * _randn(x, generator)
        x = _hooks(i, x, d, a_s, callback, after_step)
    return x


def _lambda(abar: float) -> float:
    """Half the log-SNR, log(alpha/sigma), +inf at abar = 1; abar = 0 counts as 2^-24 (as in diffusers), so that
    the step from abar_T = 0 has a finite size and the next step keeps its second-order correction."""
    if abar >= 1.0:
        return math.inf
    abar = max(abar, TERMINAL_ABAR)
    return 0.5 * math.log(abar / (1 - abar))


@torch.no_grad()
def dpmpp_2m(denoiser: Denoise, x: torch.Tensor, levels: NoiseLevels, *, generator: torch.Generator | None = None,
             callback: Callback = None, after_step: AfterStep = None) -> torch.Tensor:
    """DPM-Solver++(2M), data prediction, multistep midpoint form (Lu et al. 2022, Algorithm 2). Deterministic.

    x_s = (sigma_s/sigma_t) x_t - alpha_s (e^-h - 1) D',  h = lambda_s - lambda_t,  D' = D + (D - D_prev)/(2r),
    r = h_prev/h. The first step is first order; the last, to abar = 1, returns D. From abar_T = 0 the update
    uses sigma_T = 1 exactly (x_s = sigma_s x_T + ...), finite.
    """
    d_prev, h_prev = None, math.inf
    for i, (t, a_t, a_s) in enumerate(levels.steps()):
        d = denoiser(x, t, a_t)
        if a_s >= 1.0:
            x = d
        else:
            h = _lambda(a_s) - _lambda(a_t)
            corrected = d if d_prev is None else d + (d - d_prev) * (h / (2 * h_prev))
            x = ((1 - a_s) / (1 - a_t)) ** 0.5 * x - a_s**0.5 * math.expm1(-h) * corrected
            d_prev, h_prev = d, h
        x = _hooks(i, x, d, a_s, callback, after_step)
    return x


@torch.no_grad()
def euler_ancestral(denoiser: Denoise, x: torch.Tensor, levels: NoiseLevels, *, eta: float = 1.0,
                    generator: torch.Generator | None = None, callback: Callback = None,
                    after_step: AfterStep = None) -> torch.Tensor:
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``), written in VP coordinates.

    In VE noise levels s = sigma/alpha: s_up = min(s_s, eta s_s sqrt(1 - (s_s/s_t)^2)), s_down = sqrt(s_s^2 - s_up^2);
    an Euler step to s_down along eps, then fresh noise of std s_up: x_s/alpha_s = D + s_down eps + s_up z.
    """
    _check_eta(eta)
    for i, (t, a_t, a_s) in enumerate(levels.steps()):
        d = denoiser(x, t, a_t)
        if a_s >= 1.0:
            x = d
        else:
            s_s = ((1 - a_s) / a_s) ** 0.5
            ratio = s_s * (a_t / (1 - a_t)) ** 0.5  # s_s / s_t, 0 at abar_t = 0
            s_up = min(s_s, eta * s_s * max(1 - ratio**2, 0.0) ** 0.5)
            s_down = max(s_s**2 - s_up**2, 0.0) ** 0.5
            x = a_s**0.5 * (d + s_down * _eps(x, d, a_t))
            if s_up > 0:
                x = x + a_s**0.5 * s_up * _randn(x, generator)
        x = _hooks(i, x, d, a_s, callback, after_step)
    return x


# name -> (sampler, the spacing it implies or None for the model's own)
SAMPLERS: dict[str, tuple[Callable[..., torch.Tensor], str | None]] = {
    "ddpm": (ddpm, None),
    "ddim": (ddim, None),
    "dpmpp_2m": (dpmpp_2m, None),
    "dpmpp_2m_karras": (dpmpp_2m, "karras"),
    "euler_a": (euler_ancestral, None),
}


def check_sampler(name: str, options: dict | None = None) -> tuple[Callable[..., torch.Tensor], str | None]:
    """The sampler and its implied spacing; refuses unknown names and options the sampler does not take."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; expected one of {sorted(SAMPLERS)}")
    fn, spacing = SAMPLERS[name]
    accepted = {p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}
    accepted -= {"generator", "callback", "after_step"}
    unknown = sorted(set(options or {}) - accepted)
    if unknown:
        takes = f"takes {sorted(accepted)}" if accepted else "takes no options"
        raise ValueError(f"sampler '{name}' does not use {unknown}; it {takes}")
    if "eta" in (options or {}):
        _check_eta(options["eta"])
    return fn, spacing


def sample(name: str, denoiser: Denoise, x: torch.Tensor, levels: NoiseLevels, *,
           generator: torch.Generator | None = None, callback: Callback = None, after_step: AfterStep = None,
           **options) -> torch.Tensor:
    """Run the named sampler; ``options`` (e.g. ``eta``) must be ones it takes."""
    fn, _ = check_sampler(name, options)
    return fn(denoiser, x, levels, generator=generator, callback=callback, after_step=after_step, **options)
