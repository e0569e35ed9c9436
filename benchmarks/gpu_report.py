"""One command for a GPU report: MFU of an SD-size U-Net, the demo networks' steps, the ldm_f8 loop and its cache.

    python benchmarks/gpu_report.py          # on one GPU, about 6-8 minutes -> benchmarks/results/gpu_report.md

1. ``mfu.py`` (SD 1.x U-Net, 256 px, bf16, eager and torch.compile'd, vs diffusers) at batch 16 and 64.
2. ``train_step.py`` on the device: the ldm_f8 U-Net and ae_f8 autoencoder steps vs diffusers.
3. The ldm_f8 training loop as a user runs it (``train.py experiment=ldm_f8``: the configs' per-device batch,
   compile, bf16) over a random-weight ae_f8-size first stage (no trained one needed): the latent cache's build
   time for the built-in dataset (70,000 images), then images/s of the loop and the GPU's utilisation
   (``nvidia-smi``, sampled every 200 ms while it trains).
Each part runs as its own process with its own time limit; a part that fails or times out is reported as
such and the others still run. The sub-reports are written beside this one (``mfu_sd_cuda_b16.md``, ...).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from ldm.utils.config import compose

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ROOT,
    SMOKE_ENV,
    add_smoke_arg,
    make_smoke_first_stage,
    markdown_table,
    smoke_dir,
    write_result,
)

HERE = Path(__file__).resolve().parent


def run_part(name: str, cmd: list[str], timeout: float, log: Path) -> dict:
    """Run one part as a child process; returns its status and wall time (its output goes to ``log``)."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - start
    print(f"{name}: {status} in {seconds:.0f} s (log {log})", flush=True)
    return {"part": name, "status": status, "seconds": f"{seconds:.0f}", "log": str(log)}


class UtilisationSampler:
    """GPU utilisation (% of time a kernel ran) sampled by ``nvidia-smi`` while the block runs."""

    def __init__(self, period_ms: int = 200):
        self.period_ms, self.samples, self._proc = period_ms, [], None

    def __enter__(self) -> UtilisationSampler:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                           f"-lms={self.period_ms}", "-i", "0"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line))

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    def summary(self) -> str:
        if not self.samples:
            return "n/a (no nvidia-smi)"
        busy = self.samples[len(self.samples) // 10:]  # past start-up (compile, data workers)
        return f"median {statistics.median(busy):.0f}%, mean {statistics.mean(busy):.0f}% ({len(busy)} samples)"


def ldm_loop(work: Path, steps: int, smoke: bool) -> list[dict]:
    """Latent-cache build time and the ldm_f8 loop's images/s with the GPU's utilisation (in this process)."""
    from omegaconf import OmegaConf

    from ldm.training import build, train

    first_stage = work / "exports" / "ae_f8_random"
    if smoke:
        make_smoke_first_stage(first_stage)
    else:  # the ae_f8 network at its real size, random weights: the loop's cost does not depend on them
        from ldm.checkpoints import FIRST_STAGE, export_folder
        from ldm.networks.autoencoder import AutoencoderKL

        cfg = dict(compose(["experiment=ae_f8"]).model.autoencoder)
        cfg.pop("_target_")
        export_folder(first_stage, AutoencoderKL(**cfg), FIRST_STAGE,
                      {"_target_": "ldm.networks.autoencoder.AutoencoderKL", **cfg}, {"downsampling_factor": 8})
    paths = [f"paths.data_dir={work}/data", f"paths.export_dir={work}/exports", f"paths.log_dir={work}/logs"]
    overrides = ["experiment=ldm_f8", "task_name=gpu_report_ldm_f8", f"model.first_stage={first_stage}", *paths,
                 f"paths.output_dir={work}/logs/gpu_report_ldm_f8", f"trainer.max_steps={steps}",
                 "trainer.max_time=null", "data.prepare.limits.val=null", "callbacks.image_logger=null"]
    if smoke:
        overrides += ["+data.prepare.image_prepare.limit=64", "model.unet.model_channels=16",
                      "model.unet.num_head_channels=8", "data.batch_size=4", "data.val_limit=8"]
    cfg = compose(overrides)
    # The image shards first (not part of the cache's time), as the ae_f8 run before would have written them.
    build(compose(["experiment=ae_f8", *paths, *(["+data.prepare.limit=64"] if smoke else [])]).data).prepare_data()
    datamodule = build(cfg.data)
    start = time.perf_counter()
    datamodule.prepare_data()
    cache_seconds = time.perf_counter() - start
    images = sum(1 for _ in Path(work, "data/latents", first_stage.name).rglob("*.tar"))
    with UtilisationSampler() as util:
        train(cfg)
    meta = OmegaConf.load(Path(work, "exports", "gpu_report_ldm_f8", "config.yaml")).metadata
    return [{"measure": "latent cache build (train 60,000 + val 10,000 images; shards "
                        f"{images})" if not smoke else "latent cache build (smoke)",
             "value": f"{cache_seconds:.1f} s"},
            {"measure": f"ldm_f8 loop, batch {cfg.data.batch_size} per device, precision {cfg.trainer.precision}, "
                        f"compile {cfg.model.compile}, {steps} steps",
             "value": f"{meta.fit_images / meta.fit_seconds:.0f} images/s"},
            {"measure": "GPU utilisation while training", "value": util.summary()}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loop-steps", type=int, default=1500, help="ldm_f8 training steps for the loop's rate")
    parser.add_argument("--part", choices=["loop"], help=argparse.SUPPRESS)
    add_smoke_arg(parser)
    args = parser.parse_args()
    smoke = smoke_dir(args)
    work = (smoke or Path(os.environ.get("TMPDIR", "/tmp"))) / "ldm_gpu_report"
    if args.part == "loop":  # run as a child: its own process, its own time limit
        rows = ldm_loop(work, 4 if smoke else args.loop_steps, smoke is not None)
        write_result("gpu_ldm_f8_loop", "ldm_f8 training loop on this device",
                     markdown_table(rows, ["measure", "value"]))
        return
    work.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no GPU: smoke only)"
    py, smoke_flag = sys.executable, ["--smoke"] if smoke else []
    compiled = [] if smoke else ["--compile"]  # compiling takes minutes on a CPU
    parts = [("mfu batch 16", [py, str(HERE / "mfu.py"), "--batch", "16", *compiled, *smoke_flag], 200),
             ("mfu batch 64", [py, str(HERE / "mfu.py"), "--batch", "64", *compiled, *smoke_flag], 200),
             ("train_step", [py, str(HERE / "train_step.py"), *smoke_flag], 120),
             ("ldm_f8 loop", [py, str(HERE / "gpu_report.py"), "--part", "loop",
                              f"--loop-steps={args.loop_steps}", *smoke_flag], 240)]
    if smoke:  # the report's own work: its loop part in a child process, that table gathered (the other parts'
        parts = [parts[3]]  # scripts have smoke tests of their own)
    status = [run_part(name, cmd, timeout, work / f"{name.replace(' ', '_')}.log") for name, cmd, timeout in parts]
    results = Path(os.environ[SMOKE_ENV]) / "results" if smoke else HERE / "results"
    sections = []
    for name in ("mfu_sd_cuda_b16", "mfu_sd_cuda_b64", "train_step_cuda", "gpu_ldm_f8_loop") if not smoke else \
            ("gpu_ldm_f8_loop",):
        path = results / f"{name}.md"
        sections.append(f"## {name}\n\n" + (path.read_text().split("\n", 2)[2] if path.is_file() else "(not written)"))
    body = (f"Device: {device}; torch {torch.__version__}.\n\n" + markdown_table(status, list(status[0]))
            + "\n\n" + "\n\n".join(sections))
    path = write_result("gpu_report", "GPU report", body)
    print(body, f"\nwritten to {path}", sep="\n")


if __name__ == "__main__":
    main()
