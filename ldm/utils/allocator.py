"""The host memory allocator's policy for a training process (glibc malloc on Linux).

By default glibc serves every allocation above a (self-adjusting) threshold with its own ``mmap`` and
hands it back to the kernel on ``free``, and trims free memory at the top of the heap. A training step
allocates and frees the same large activation tensors every step, so the kernel maps fresh zeroed pages
for them each time and every first touch is a page fault. ``retain_freed_memory`` makes malloc serve
blocks up to ``mmap_threshold`` from its heap and keep what is freed for reuse. The cost is that the
process keeps its peak heap instead of shrinking between steps. Measured in
``benchmarks/allocator.py`` (results in ``benchmarks/results/allocator.md``).
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# The largest M_MMAP_THRESHOLD mallopt(3) documents for 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
MAX_MMAP_THRESHOLD = 32 * 2**20
# Keep up to this much free memory at the heap top instead of trimming it (the largest value an int takes).
TRIM_THRESHOLD = 2**31 - 1

POLICIES = ("retain", "default")


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (Linux), else None (macOS, musl, Windows: nothing to set)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL("libc.so.6")


def retain_freed_memory(mmap_threshold: int = MAX_MMAP_THRESHOLD) -> bool:
    """Serve blocks up to ``mmap_threshold`` bytes from the heap and keep freed memory; True if applied."""
    libc = glibc()
    if libc is None:
        log.debug("host allocator left as it is: not glibc")
        return False
    applied = (libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)) == 1
               and libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD)) == 1)
    if not applied:
        log.warning("glibc rejected mallopt(M_MMAP_THRESHOLD=%d, M_TRIM_THRESHOLD=%d); allocator left as it is",
                    mmap_threshold, TRIM_THRESHOLD)
    return applied


def apply_policy(policy: str, key: str = "host_allocator") -> bool:
    """``retain``: :func:`retain_freed_memory`; ``default``: leave the allocator alone. True if changed."""
    if policy not in POLICIES:
        raise ValueError(f"{key}={policy!r} is not a host allocator policy; expected one of {', '.join(POLICIES)}")
    return retain_freed_memory() if policy == "retain" else False
