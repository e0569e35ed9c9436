"""Helpers shared by the benchmark scripts: results go to benchmarks/results/<name>.md."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from ldm.evaluation.report import machine, markdown_table
from ldm.utils.config import compose
from ldm.utils.timing import median_seconds

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
SMOKE_ENV = "LDM_BENCH_SMOKE_DIR"

__all__ = ["RESULTS", "ROOT", "SMOKE_ENV", "add_smoke_arg", "interleaved_medians", "make_smoke_first_stage",
           "make_smoke_pipeline", "markdown_table", "median_seconds", "native_bf16", "peak_rss_mb", "smoke_dir",
           "write_result"]


def add_smoke_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run that only proves the script works (CI): tiny sizes, everything it writes "
                             "(data, models, results) under a temporary folder, benchmarks/results untouched")


def smoke_dir(args: argparse.Namespace) -> Path | None:
    """Under ``--smoke``: the temporary folder this run writes into (also set for child processes), else None."""
    if not getattr(args, "smoke", False):
        return None
    if SMOKE_ENV not in os.environ:
        os.environ[SMOKE_ENV] = tempfile.mkdtemp(prefix="ldm_bench_smoke_")
    return Path(os.environ[SMOKE_ENV])


def write_result(name: str, title: str, body: str) -> Path:
    folder = Path(os.environ[SMOKE_ENV]) / "results" if SMOKE_ENV in os.environ else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.md"
    path.write_text(f"# {title}\n\nMachine: {machine()}\n\n{body}\n")
    return path


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


def make_smoke_first_stage(folder: Path) -> Path:
    """A tiny random-weight f=8 first stage at 64 px, exported as training would (for --smoke)."""
    from ldm.checkpoints import FIRST_STAGE, export_folder
    from ldm.networks.autoencoder import AutoencoderKL

    cfg = {"ch": 8, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "resolution": 64, "z_channels": 4, "embed_dim": 4}
    ae = AutoencoderKL(**cfg)
    export_folder(folder, ae, FIRST_STAGE, {"_target_": "ldm.networks.autoencoder.AutoencoderKL", **cfg},
                  {"downsampling_factor": ae.downsampling_factor})
    return folder


def make_smoke_pipeline(folder: Path) -> Path:
    """A tiny random-weight text-conditional ldm_f8 pipeline over a tiny first stage, exported (for --smoke)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    first_stage = make_smoke_first_stage(folder.parent / f"{folder.name}_first_stage")
    cfg = compose(["experiment=ldm_f8", f"model.first_stage={first_stage}", "model.unet.model_channels=16",
                   "model.unet.num_head_channels=8", "model.conditioner.embedders.0.arch.width=16",
                   "model.conditioner.embedders.0.arch.layers=1", "model.conditioner.embedders.0.arch.heads=2",
                   "model.conditioner.embedders.0.embed_dim=16"])
    stage = instantiate(cfg.model)
    pipe = stage.pipeline()
    pipe.config = OmegaConf.to_container(cfg.model, resolve=True)
    return pipe.save_pretrained(folder)
