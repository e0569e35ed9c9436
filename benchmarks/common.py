"""Helpers shared by the benchmark scripts: results go to benchmarks/results/<name>.md."""

from __future__ import annotations

from pathlib import Path

from ldm.evaluation.report import machine, markdown_table

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS", "markdown_table", "write_result"]


def write_result(name: str, title: str, body: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(f"# {title}\n\nMachine: {machine()}\n\n{body}\n")
    return path
