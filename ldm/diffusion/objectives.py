"""Prediction parameterisations and the training loss.

With alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t) and x_t = alpha x0 + sigma eps:
  v = alpha eps - sigma x0 (Salimans & Ho 2022, sec. 4), so x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v.
The network predicts eps, v or x0 itself; ``ldm.diffusion.denoiser`` turns each into the x0 estimate samplers use.
"""

from __future__ import annotations

import torch

PREDICTIONS = ("eps", "v", "x0")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type '{prediction}'; expected one of {PREDICTIONS}")
    return prediction


def v_target(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return alpha * eps - sigma * x0


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return alpha * x_t - sigma * v


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sigma eps) / alpha (Ho et al. 2020, eq. 15 rearranged)."""
    return (x_t - sigma * eps) / alpha


def training_target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor,
                    sigma: torch.Tensor) -> torch.Tensor:
    if prediction == "x0":
        return x0
    return eps if prediction == "eps" else v_target(x0, eps, alpha, sigma)


def min_snr_weight(snr: torch.Tensor, gamma: float | None, prediction: str) -> torch.Tensor:
    """Per-sample loss weight of Min-SNR-gamma (Hang et al. 2023, eq. 9 and its v-prediction form).

    For eps-prediction: min(SNR, gamma) / SNR; for v-prediction: min(SNR, gamma) / (SNR + 1); for x0-prediction:
    min(SNR, gamma).
    ``gamma=None`` gives weight 1 (the plain MSE of Ho et al.).
    """
    if gamma is None:
        return torch.ones_like(snr)
    clipped = snr.clamp(max=gamma)
    if prediction == "x0":
        return clipped
    return clipped / snr.clamp(min=1e-8) if prediction == "eps" else clipped / (snr + 1)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample MSE over all but the batch dimension, times ``weight`` (float32)."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return per_sample if weight is None else per_sample * weight
