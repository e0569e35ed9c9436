"""Scaled dot-product attention, choosing the fastest kernel for where and how it runs.

``F.scaled_dot_product_attention`` picks a fused (flash) kernel on every device. On a CPU in bf16 that
kernel's backward pass is slow: for the U-Net's short sequences (16-77 tokens, 32-wide heads) the explicit
product below runs forward + backward 3-10x faster (measured on a 2-core AVX-512-BF16 CPU; the effect on a
training step is in benchmarks/results/train_step.md). fp32 keeps the fused kernel (no faster there). The
explicit form materialises the (N, M) score matrix, so it is used only where that matrix is small; long
sequences (the autoencoder at high resolution, Stable-Diffusion-size U-Nets) keep the fused kernel and its
memory bound.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Largest query x key length (per batch element and head) for the explicit product. Measured crossover
# on a 2-core AVX-512-BF16 CPU: 256 x 256 is about even, 1024 x 1024 is 1.4x slower than the fused kernel.
EXPLICIT_MAX_SCORES = 256 * 256


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (..., N, d) queries and (..., M, d) keys/values (Vaswani et al. 2017, eq. 1)."""
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16
            and q.shape[-2] * k.shape[-2] <= EXPLICIT_MAX_SCORES):
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        # Softmax in fp32 as the fused kernels accumulate it; the products stay in bf16.
        return scores.softmax(-1, dtype=torch.float32).to(v.dtype) @ v
    return F.scaled_dot_product_attention(q, k, v)
