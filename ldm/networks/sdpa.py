"""Scaled dot-product attention, on the kernel that is fastest where it runs (ldm.networks.device_paths decides).

PyTorch's ``F.scaled_dot_product_attention`` picks a fused kernel (flash / memory-efficient on GPUs). On a
CPU in bf16 the fused kernel's backward is slow for short sequences, where the explicit product below is
used instead; it materialises the (N, M) score matrix, so only where that matrix is small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm.networks.device_paths import explicit_attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (..., N, d) queries and (..., M, d) keys/values (Vaswani et al. 2017, eq. 1)."""
    if explicit_attention(q, k):
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        # Softmax in fp32 as the fused kernels accumulate it; the products stay in bf16.
        return scores.softmax(-1, dtype=torch.float32).to(v.dtype) @ v
    return F.scaled_dot_product_attention(q, k, v)
