"""Samplers as pure functions of a denoiser ``denoise(x_t, t) -> eps`` (CFG already inside it).

Every sampler walks a descending list of integer timesteps ``t_0 > t_1 > ... > t_{n-1}`` and
finally to the clean sample (abar = 1). Hooks:
  ``callback(i, t, x, x0_pred)`` after each step (progress bars, previews);
  ``after_step(x, t_next) -> x`` rewrites the state after each step (inpainting re-imposes the known
  region noised to ``t_next``; ``t_next = -1`` means clean).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ldm.diffusion.objectives import x0_from_eps
from ldm.diffusion.schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None] | None
AfterStep = Callable[[torch.Tensor, int], torch.Tensor] | None
SPACINGS = ("trailing", "leading", "linspace")


def make_timesteps(num_timesteps: int, steps: int, spacing: str = "trailing") -> torch.Tensor:
    """Descending timesteps as in Lin et al. 2024, Table 2 (and diffusers' ``timestep_spacing``).

    ``trailing`` starts at T-1 (needed for zero-terminal-SNR); ``leading`` at T - T/steps;
    ``linspace`` spreads ``steps`` points evenly over [0, T-1].
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps={steps} must be between 1 and the schedule's {num_timesteps} timesteps")
    if spacing == "trailing":
        ts = torch.round(torch.arange(num_timesteps, 0, -num_timesteps / steps, dtype=torch.float64)) - 1
    elif spacing == "leading":
        ts = (torch.arange(steps, dtype=torch.float64) * (num_timesteps // steps)).flip(0)
    elif spacing == "linspace":
        ts = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().flip(0)
    else:
        raise ValueError(f"unknown timestep spacing '{spacing}'; expected one of {SPACINGS}")
    return ts.long()


def _abar(schedule: NoiseSchedule, t: int) -> float:
    """abar_t, with abar_{-1} = 1 (the clean end point)."""
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def _pairs(timesteps: torch.Tensor) -> list[tuple[int, int]]:
    ts = [int(t) for t in timesteps]
    return list(zip(ts, ts[1:] + [-1], strict=True))


def _tvec(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _resolve(schedule: NoiseSchedule, steps: int, timesteps: torch.Tensor | None, spacing: str) -> torch.Tensor:
    return make_timesteps(schedule.num_timesteps, steps, spacing) if timesteps is None else timesteps


Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float, int], torch.Tensor]


def _walk(denoise: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, timesteps: torch.Tensor, step: Step,
          callback: Callback, after_step: AfterStep) -> torch.Tensor:
    """The loop every sampler shares: predict eps and x0 at t, let ``step`` move x to s, run the hooks."""
    for i, (t, s) in enumerate(_pairs(timesteps)):
        a_t, a_s = _abar(schedule, t), _abar(schedule, s)
        eps = denoise(x, _tvec(t, x))
        x0 = x0_from_eps(x, eps, a_t**0.5, (1 - a_t) ** 0.5)
        x = step(x, x0, eps, a_t, a_s, s)
        if after_step is not None:
            x = after_step(x, s)
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def ddim_sample(denoise: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int = 50, *, eta: float = 0.0,
                timesteps: torch.Tensor | None = None, spacing: str = "trailing",
                generator: torch.Generator | None = None, callback: Callback = None,
                after_step: AfterStep = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12); ``eta=0`` is deterministic, ``eta=1`` is DDPM-like ancestral.

    x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s).
    """

    def step(x, x0, eps, a_t, a_s, s):
        sigma = eta * ((1 - a_s) / (1 - a_t)) ** 0.5 * (1 - a_t / a_s) ** 0.5
        x = a_s**0.5 * x0 + max(1 - a_s - sigma**2, 0.0) ** 0.5 * eps
        return x + sigma * _randn_like(x, generator) if sigma > 0 and s >= 0 else x

    return _walk(denoise, x, schedule, _resolve(schedule, steps, timesteps, spacing), step, callback, after_step)


@torch.no_grad()
def ddpm_sample(denoise: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int = 1000, *,
                timesteps: torch.Tensor | None = None, spacing: str = "trailing",
                generator: torch.Generator | None = None, callback: Callback = None,
                after_step: AfterStep = None) -> torch.Tensor:
    """Ancestral sampling from the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, eqs. 6-7), over any
    sub-sequence of timesteps: with alpha = abar_t/abar_s and beta = 1 - alpha,
    mean = sqrt(abar_s) beta/(1-abar_t) x0 + sqrt(alpha)(1-abar_s)/(1-abar_t) x_t, var = (1-abar_s)/(1-abar_t) beta.
    """

    def step(x, x0, eps, a_t, a_s, s):
        alpha, beta = a_t / a_s, 1 - a_t / a_s
        x = (a_s**0.5 * beta / (1 - a_t)) * x0 + (alpha**0.5 * (1 - a_s) / (1 - a_t)) * x
        return x + ((1 - a_s) / (1 - a_t) * beta) ** 0.5 * _randn_like(x, generator) if s >= 0 else x

    return _walk(denoise, x, schedule, _resolve(schedule, steps, timesteps, spacing), step, callback, after_step)


@torch.no_grad()
def dpmpp_2m_sample(denoise: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int = 20, *,
                    timesteps: torch.Tensor | None = None, spacing: str = "trailing",
                    generator: torch.Generator | None = None, callback: Callback = None,
                    after_step: AfterStep = None) -> torch.Tensor:
    """DPM-Solver++(2M), data prediction, multistep midpoint form (Lu et al. 2022, Algorithm 2).

    With lambda = log(alpha/sigma) and h = lambda_s - lambda_t:
      x_s = (sigma_s/sigma_t) x_t - alpha_s (e^{-h} - 1) D,  D = x0_t + (x0_t - x0_prev)/(2r), r = h_prev/h.
    The first step is first order; the last, to the clean sample, returns the data prediction.
    Deterministic: ``generator`` is accepted for a uniform signature.
    """
    prev: dict[str, object] = {"x0": None, "h": None}

    def step(x, x0, eps, a_t, a_s, s):
        if s < 0:
            return x0
        alpha_t, sigma_t = a_t**0.5, (1 - a_t) ** 0.5
        alpha_s, sigma_s = a_s**0.5, (1 - a_s) ** 0.5
        h = math.log(alpha_s / sigma_s) - math.log(alpha_t / sigma_t)
        d = x0 if prev["x0"] is None else x0 + (x0 - prev["x0"]) * (h / (2 * prev["h"]))
        prev["x0"], prev["h"] = x0, h
        return (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * d

    return _walk(denoise, x, schedule, _resolve(schedule, steps, timesteps, spacing), step, callback, after_step)


SAMPLERS = {"ddim": ddim_sample, "ddpm": ddpm_sample, "dpmpp_2m": dpmpp_2m_sample}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
