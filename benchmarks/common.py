"""Helpers shared by the benchmark scripts: results go to benchmarks/results/<name>.md."""

from __future__ import annotations

from pathlib import Path

from ldm.evaluation.report import machine, markdown_table

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS", "interleaved_medians", "markdown_table", "median_seconds", "native_bf16", "peak_rss_mb",
           "write_result"]


def write_result(name: str, title: str, body: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(f"# {title}\n\nMachine: {machine()}\n\n{body}\n")
    return path


def median_seconds(fn, warmup: int = 2, iters: int = 5) -> float:
    """Median wall time of ``fn()`` over ``iters`` runs after ``warmup`` runs."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, warmup: int = 2, rounds: int = 7) -> dict:
    """Median wall time of each of ``fns`` (name -> callable), timed in alternation round by round.

    Timing the candidates in turn within each round, rather than one block after another, keeps the
    machine's drift (10-20% here) from landing on one side of a comparison.
    """
    import statistics
    import time

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def native_bf16() -> bool:
    """Whether bf16 runs natively here (else a bf16 benchmark would time an emulation)."""
    import torch

    from ldm.utils.config import cpu_supports_bf16

    return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_supports_bf16()
