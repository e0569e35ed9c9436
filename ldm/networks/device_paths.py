"""The one place that decides where a network leaves its plain path for a device-specific one.

Two such paths exist, both measured to win on CPUs only (benchmarks/results/train_step.md; the 2-core
AVX-512-BF16 and AVX2 EPYC measurements are in the README's performance notes):
- attention in bf16 on a CPU for short sequences as an explicit product with an fp32 softmax
  (``ldm.networks.sdpa``): PyTorch's fused CPU kernel's backward is 3-10x slower there;
- nearest-x2 upsampling + 3x3 convolution as four 2x2 convolutions on the low-resolution input
  (``ldm.networks.resample``): 2.25x fewer FLOPs, the layer 1.16-1.4x faster forward + backward.
On GPUs both keep the plain path (fused SDPA: flash / memory-efficient kernels; interpolate + conv),
which torch.compile fuses as it knows them. ``plain_paths()`` forces the plain path everywhere, e.g. to
count the operators a GPU would run (benchmarks/op_count.py) on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Largest query x key length (per batch element and head) for the explicit product. Measured crossover on a
# 2-core AVX-512-BF16 CPU: 256 x 256 is about even, 1024 x 1024 is 1.4x slower than the fused kernel.
EXPLICIT_MAX_SCORES = 256 * 256
# Below this input side the four-phase upsampler's border overhead ((H+1)^2 / H^2) outweighs its savings.
PHASE_MIN_SIZE = 8

_plain = False


@contextmanager
def plain_paths() -> Iterator[None]:
    """Within this block every network takes its plain (GPU) path, on any device."""
    global _plain
    before, _plain = _plain, True
    try:
        yield
    finally:
        _plain = before


def explicit_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether attention over ``q``, ``k`` runs as an explicit product (bf16, CPU, short sequences)."""
    return (not _plain and q.device.type == "cpu" and q.dtype == torch.bfloat16
            and q.shape[-2] * k.shape[-2] <= EXPLICIT_MAX_SCORES)


def phase_upsample(x: torch.Tensor) -> bool:
    """Whether nearest-x2 + 3x3 convolution of ``x`` runs as four 2x2 convolutions (CPU, side >= 8)."""
    return not _plain and x.device.type == "cpu" and min(x.shape[-2:]) >= PHASE_MIN_SIZE
