"""Tables (Markdown + CSV) and plots (PNG) for benchmark and ablation reports."""

from __future__ import annotations

import csv
import os
import platform
from pathlib import Path

import torch


def machine() -> str:
    """One line describing where a number was measured: CPU and its vector ISA, cores, torch, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    # Same model name, different speed: the ISA PyTorch's CPU kernels run with (AVX2, AVX512, ...) tells them apart.
    cpu += f" ({torch.backends.cpu.get_cpu_capability()})"
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_table(rows: list[dict], out_dir: str | Path, name: str, title: str, preamble: str = "") -> Path:
    """``<out_dir>/<name>.md`` (title, machine, preamble, table) and ``<name>.csv``; returns the .md path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0]) if rows else []
    with open(out_dir / f"{name}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    md = out_dir / f"{name}.md"
    md.write_text(f"# {title}\n\nMachine: {machine()}\n\n{preamble}\n\n{markdown_table(rows, columns)}\n")
    return md


def _save(fig, path: str | Path) -> Path:
    """Lay out, write as PNG (its folder made) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def line_plot(path: str | Path, x: list[float], series: dict[str, list[float | None]], xlabel: str,
              title: str, log2_x: bool = False) -> Path:
    """One panel per series (each has its own scale) against a shared x axis, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.4), squeeze=False)
    for ax, (label, values) in zip(axes[0], series.items(), strict=True):
        pts = [(a, b) for a, b in zip(x, values, strict=True) if b is not None]
        ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o")
        ax.set_xlabel(xlabel)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if log2_x:
            ax.set_xscale("log", base=2)
            ax.set_xticks(x, [f"{v:g}" for v in x])
    fig.suptitle(title)
    return _save(fig, path)


def pareto_plot(path: str | Path, series: dict[str, list[tuple[float, float, str]]], front: list[tuple[float, float]],
                title: str) -> Path:
    """Class accuracy against FID: one line per series through its (fid, accuracy, label) points, each point
    labelled (e.g. its cfg scale), and the Pareto front as a dashed step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        for fid, acc, label in points:
            ax.annotate(label, (fid, acc), textcoords="offset points", xytext=(3, 3), fontsize=7)
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", linestyle="--", color="black",
                linewidth=1, label="Pareto front")
    ax.set_xlabel("FID (lower is better)")
    ax.set_ylabel("class accuracy % (higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
