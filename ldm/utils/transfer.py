"""Host data to the device without stalling it: from pinned memory, asynchronously.

A copy from ordinary (pageable) host memory to a CUDA device synchronises the host with the copy, and so with
the stream it is queued on; from pinned (page-locked) memory with ``non_blocking=True`` it is queued like a kernel.
"""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` (a CPU tensor built on the host: token ids, a dropout mask) on ``device``: pinned and copied
    asynchronously where the device is a CUDA one, a plain ``.to`` elsewhere (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=device.type == "cuda")
