"""FSDP against DDP on the same batches: loss curves, peak memory, and the FSDP checkpoint on a CPU.

    python benchmarks/fsdp_check.py           # on a GPU, a few minutes -> benchmarks/results/fsdp_check.md
    python benchmarks/fsdp_check.py --smoke   # CI: a tiny U-Net, the DDP half only (Lightning refuses FSDP on a CPU)

1. ``train.py experiment=ldm_f8 model/unet=sd`` (865M-parameter U-Net) for ``--steps`` steps under ``trainer=fsdp``
   and under ``trainer=ddp_bf16``, same seed, same data order (each its own process, over a random-weight ae_f8-size
   first stage and the built-in data's latent cache): the training loss of every step and the peak GPU memory.
2. ``sample.py`` on the CPU (``CUDA_VISIBLE_DEVICES=``) from each run's ``last.ckpt``, and the export each run wrote
   at its end: whether a sharded run's checkpoint serves sampling and export on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_smoke_arg, make_smoke_first_stage, markdown_table, smoke_dir, write_result  # noqa: E402

HERE = Path(__file__).resolve().parent


class PeakMemory(L.Callback):
    """Writes the peak GPU memory of training (GiB; 0 on a CPU) to ``out`` when training ends."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_start(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
            self.out.write_text(json.dumps({"peak_gib": peak, "world_size": trainer.world_size}))


def first_stage(work: Path, smoke: bool) -> Path:
    """A random-weight first stage: tiny under --smoke, else ae_f8's network at its real size."""
    folder = work / "exports" / "ae_f8_random"
    if folder.is_dir():
        return folder
    if smoke:
        return make_smoke_first_stage(folder)
    from ldm.checkpoints import FIRST_STAGE, export_folder
    from ldm.networks.autoencoder import AutoencoderKL
    from ldm.utils.config import compose

    cfg = dict(compose(["experiment=ae_f8"]).model.autoencoder)
    cfg.pop("_target_")
    export_folder(folder, AutoencoderKL(**cfg), FIRST_STAGE, {"_target_": "ldm.networks.autoencoder.AutoencoderKL",
                                                                **cfg}, {"downsampling_factor": 8})
    return folder


def train_command(work: Path, strategy: str, steps: int, batch: int, smoke: bool) -> list[str]:
    stage = first_stage(work, smoke)
    run = work / "runs" / strategy
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=ldm_f8", f"task_name=fsdp_check_{strategy}",
           f"trainer={strategy}", f"model.first_stage={stage}", f"paths.root_dir={work}", f"paths.output_dir={run}",
           f"hydra.run.dir={run}", f"trainer.max_steps={steps}", "trainer.max_time=null", "trainer.log_every_n_steps=1",
           f"data.batch_size={batch}", f"+data.prepare.image_prepare.limit={64 if smoke else 2048}",
           "data.val_limit=64",
           "callbacks.image_logger=null", "callbacks.lr_schedule.warmup_steps=0", "model.compile=false",
           f"callbacks.model_checkpoint.every_n_train_steps={steps}", "logger=csv",
           "+callbacks.peak._target_=fsdp_check.PeakMemory", f"+callbacks.peak.out={run}/peak.json"]
    if smoke:  # a CPU: a tiny U-Net, the first stage at 64 px, fp32
        cmd += ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
                "model.unet.model_channels=16", "model.unet.num_head_channels=8",
                "model.conditioner.embedders.0.arch.width=16", "model.conditioner.embedders.0.arch.layers=1",
                "model.conditioner.embedders.0.arch.heads=2", "model.conditioner.embedders.0.embed_dim=16"]
    else:
        cmd.insert(3, "model/unet=sd")
    return cmd


def run(cmd: list[str], log: Path, timeout: float, **env: str) -> str:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{ROOT}", **env}).returncode
            return "ok" if code == 0 else f"failed (exit {code}, {log})"
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout:.0f} s ({log})"


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path) as fh:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="per device")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per training run")
    add_smoke_arg(parser)
    args = parser.parse_args()
    smoke = smoke_dir(args)
    work = (smoke or Path(os.environ.get("TMPDIR", "/tmp"))) / "ldm_fsdp_check"
    steps, batch = (3, 2) if smoke else (args.steps, args.batch)
    strategies = ["ddp_bf16"] if smoke or not torch.cuda.is_available() else ["fsdp", "ddp_bf16"]
    rows, curves = [], {}
    for strategy in strategies:
        run_dir = work / "runs" / strategy
        status = run(train_command(work, strategy, steps, batch, smoke is not None), work / f"{strategy}.log",
                     args.timeout)
        peak = json.loads((run_dir / "peak.json").read_text()) if (run_dir / "peak.json").is_file() else {}
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        on_cpu = run([sys.executable, str(ROOT / "sample.py"), f"model_path={ckpt}", "num_images=1", "steps=2",
                      f"out_dir={work}/samples/{strategy}", "prompt=a photo of a bag"],
                     work / f"{strategy}_sample_cpu.log", 300, CUDA_VISIBLE_DEVICES="") if ckpt.is_file() else "no ckpt"
        export = work / "exports" / f"fsdp_check_{strategy}"
        exported = run([sys.executable, str(ROOT / "sample.py"), f"model_path={export}", "num_images=1", "steps=2",
                        f"out_dir={work}/samples/{strategy}_export", "prompt=a photo of a bag"],
                       work / f"{strategy}_export_cpu.log", 300, CUDA_VISIBLE_DEVICES="") if export.is_dir() \
            else "no export"
        curves[strategy] = losses(run_dir)
        rows.append({"strategy": strategy, "training": status, "peak GPU memory": f"{peak.get('peak_gib', 0):.2f} GiB",
                     "world size": peak.get("world_size", "?"), "last.ckpt -> sample.py on CPU": on_cpu,
                     "export -> sample.py on CPU": exported})
    steps_seen = sorted(set().union(*curves.values())) if curves else []
    curve_rows = [{"step": s, **{k: f"{v[s]:.4f}" if s in v else "-" for k, v in curves.items()}} for s in steps_seen]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (FSDP needs a GPU: DDP half only)"
    body = (f"Device: {device}; torch {torch.__version__}; `model/unet={'small (tiny)' if smoke else 'sd'}`, "
            f"batch {batch} per device, {steps} steps, same seed and data order.\n\n"
            + markdown_table(rows, list(rows[0])) + "\n\nTraining loss per step:\n\n"
            + (markdown_table(curve_rows, ["step", *curves]) if curve_rows else "(no losses logged)"))
    path = write_result("fsdp_check", "FSDP vs DDP on the same batches", body)
    print(body, f"\nwritten to {path}", sep="\n")
    if any(r["training"] != "ok" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
