"""Classifier-free guidance (Ho & Salimans 2022): f_u + s (f_c - f_u), both halves in one batched forward."""

from __future__ import annotations

from collections.abc import Callable

import torch

Condition = dict[str, torch.Tensor | None]
ConditionalFn = Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise ValueError("conditional and unconditional inputs must carry the same keys")
    return torch.cat([a, b])


def cfg(fn: ConditionalFn, cond: Condition, uncond: Condition | None, scale: float
        ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x_t, t) -> f`` guided with ``scale``, for any ``fn(x, t, condition)`` (the denoised estimate in our
    samplers; a raw eps/v output when driving diffusers' schedulers).

    ``cond``/``uncond`` are condition dicts (``context``, ``y``) for the batch. A negative prompt is simply its
    condition passed as ``uncond``. Scale 1 (or no ``uncond``) runs the conditional pass alone.
    """
    if uncond is None or scale == 1.0:
        return lambda x, t: fn(x, t, cond)
    both = {k: _cat(uncond.get(k), cond.get(k)) for k in cond.keys() | uncond.keys()}

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        f_u, f_c = fn(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return f_u + scale * (f_c - f_u)

    return guided
