"""Sizes of networks without their weights: parameters and FLOPs, counted on the meta device.

Built under ``torch.device("meta")``: no memory is allocated and no weights are read, so the
paper-sized networks (an 866M U-Net, a 354M text tower) are measured in seconds on any machine. FLOPs are
counted by ``torch.utils.flop_counter`` (matmuls, convolutions and attention; 2 FLOPs per multiply-add), on
the plain (GPU) paths of the networks (``ldm.networks.device_paths.plain_paths``): the nominal count of the
architecture, as ``benchmarks/mfu.py`` counts it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ldm.networks.device_paths import plain_paths

META = torch.device("meta")


def parameter_count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def count_flops(fn: Callable[[], torch.Tensor | None], backward: bool = False) -> int:
    """FLOPs of ``fn()`` (its forward) and, with ``backward``, of the backward of its output's sum."""
    with plain_paths(), FlopCounterMode(display=False) as counter:
        out = fn()
        if backward:
            out.float().sum().backward()
    return counter.get_total_flops()


def meta_input(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
    return torch.empty(shape, device=META, dtype=dtype, requires_grad=grad)
