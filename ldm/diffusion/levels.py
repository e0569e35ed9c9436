"""The noise levels a sampler visits: network timesteps and their abar, from noisiest to clean.

Notation: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; the VE noise level is s = sqrt((1 - abar)/abar).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ldm.diffusion.schedule import NoiseSchedule

SPACINGS = ("trailing", "leading", "linspace", "karras")
# Karras spacing needs a finite largest noise level: a zero-terminal-SNR schedule's abar_{T-1} = 0 is
# replaced by 2^-24 there (diffusers' choice for its sigma-space schedulers).
TERMINAL_ABAR = 2.0**-24


@dataclass(frozen=True)
class NoiseLevels:
    """``timesteps[i]`` (the network's time input) at ``abar[i]``; ``abar`` has one more entry, 1.0 (clean).

    A sampler's step i moves x from ``abar[i]`` to ``abar[i + 1]``.
    """

    timesteps: tuple[int, ...]
    abar: tuple[float, ...]

    def __post_init__(self):
        if len(self.abar) != len(self.timesteps) + 1 or self.abar[-1] != 1.0:
            raise ValueError("NoiseLevels needs one abar per timestep plus the clean end point abar = 1")

    def __len__(self) -> int:
        return len(self.timesteps)

    def steps(self) -> list[tuple[int, float, float]]:
        """(t, abar_t, abar_s) for each step, s the next level."""
        return list(zip(self.timesteps, self.abar[:-1], self.abar[1:], strict=True))

    def last(self, n: int) -> NoiseLevels:
        """The final ``n`` steps (img2img starts part-way down)."""
        k = len(self) - n
        return NoiseLevels(self.timesteps[k:], self.abar[k:])


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


def karras_levels(schedule: NoiseSchedule, steps: int, rho: float = 7.0) -> NoiseLevels:
    """Karras et al. 2022, eq. 5: s_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho between the
    schedule's extreme noise levels; each s_i's network timestep is interpolated in log s and rounded."""
    if steps < 1:
        raise ValueError(f"steps={steps}: expected >= 1")
    abar = schedule.alphas_cumprod.cpu().clone()  # host arithmetic: one copy, not a read per level
    abar[-1] = max(float(abar[-1]), TERMINAL_ABAR)
    log_s = (((1 - abar) / abar).sqrt()).log().numpy()
    s_min, s_max = float(np.exp(log_s[0])), float(np.exp(log_s[-1]))
    ramp = np.linspace(0, 1, steps)
    s = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    t = np.interp(np.log(s), log_s, np.arange(len(log_s))).round().astype(int)
    return NoiseLevels(tuple(int(v) for v in t), tuple(float(v) for v in 1 / (1 + s**2)) + (1.0,))


def make_levels(schedule: NoiseSchedule, steps: int, spacing: str = "trailing") -> NoiseLevels:
    """``steps`` noise levels of ``schedule`` with the named spacing (``karras``: sigma-spaced, see above)."""
    if spacing == "karras":
        return karras_levels(schedule, steps)
    ts = make_timesteps(schedule.num_timesteps, steps, spacing).tolist()
    abar = schedule.alphas_cumprod.cpu()  # host arithmetic: one copy, not a read per level
    return NoiseLevels(tuple(ts), tuple(float(abar[t]) for t in ts) + (1.0,))
