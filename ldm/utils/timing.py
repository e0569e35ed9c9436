"""Wall-time measurement shared by the demo's probe and the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], warmup: int = 2, iters: int = 5) -> float:
    """Median wall time of ``fn()`` over ``iters`` runs after ``warmup`` runs (allocations, kernel selection)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
