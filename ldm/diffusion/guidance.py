"""Classifier-free guidance (Ho & Salimans 2022): eps = eps_u + s (eps_c - eps_u), in one batched forward."""

from __future__ import annotations

from collections.abc import Callable

import torch

Condition = dict[str, torch.Tensor | None]
ModelFn = Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise ValueError("conditional and unconditional inputs must carry the same keys")
    return torch.cat([a, b])


def cfg(model_fn: ModelFn, cond: Condition, uncond: Condition | None, scale: float
        ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Denoiser ``(x_t, t) -> eps`` guided with ``scale``.

    ``model_fn(x, t, condition) -> eps``; ``cond``/``uncond`` are condition dicts (``context``, ``y``)
    for the batch. A negative prompt is simply its condition passed as ``uncond``. Scale 1 (or no
    ``uncond``) runs the conditional pass alone; otherwise both halves go through one forward.
    """
    if uncond is None or scale == 1.0:
        return lambda x, t: model_fn(x, t, cond)
    both = {k: _cat(uncond.get(k), cond.get(k)) for k in cond.keys() | uncond.keys()}

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps_u, eps_c = model_fn(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return denoise
