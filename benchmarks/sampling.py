"""Sampling: wall time for 64 images and quality vs steps, our samplers vs diffusers' schedulers.

    python benchmarks/sampling.py --model exports/ldm_f8

Wall time: 64 images (the ten class prompts cycled), cfg 4, our DDIM 50 and DPM-Solver++(2M) 20
vs diffusers' DDIMScheduler 50 and DPMSolverMultistepScheduler 20 stepping the same guided U-Net
(decoding included). Quality vs steps: --num-samples samples for the conditions of that many test
images, FID in the offline classifier's feature space and class accuracy, for DDIM and DPM++ at
--steps; shows where each converges.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_result  # noqa: E402

from ldm.data.fashion_mnist import caption_for  # noqa: E402
from ldm.diffusion.guidance import cfg  # noqa: E402
from ldm.evaluation.cli import add_judge_args, judge_from_args  # noqa: E402
from ldm.pipeline import LatentDiffusionPipeline  # noqa: E402


def diffusers_sample(pipe: LatentDiffusionPipeline, scheduler, prompts: list[str], steps: int, seed: int,
                     scale: float = 4.0) -> torch.Tensor:
    """diffusers' scheduler loop driving our guided U-Net; same noise as our pipeline (seed + i per image)."""
    scheduler.set_timesteps(steps)
    z_shape = pipe.first_stage.latent_shape(pipe.first_stage.resolution)
    x = torch.stack([torch.randn(z_shape, generator=torch.Generator().manual_seed(seed + i))
                     for i in range(len(prompts))])
    cond = pipe.conditioner({"caption": prompts})
    denoise = cfg(pipe.model_fn, cond, pipe.conditioner.uncond(len(prompts)), scale)
    for t in scheduler.timesteps:
        x = scheduler.step(denoise(x, torch.full((len(x),), int(t))), t, x).prev_sample
    return pipe.decode(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="exports/ldm_f8")
    parser.add_argument("--quality-steps", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    add_judge_args(parser)
    parser.set_defaults(num_samples=500)
    args = parser.parse_args()
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    sch = pipe.config["schedule"]
    common = dict(num_train_timesteps=sch["num_timesteps"], beta_start=sch["beta_start"], beta_end=sch["beta_end"],
                  beta_schedule=sch["kind"], timestep_spacing=pipe.spacing)
    prompts = [caption_for(i % 10) for i in range(64)]
    runs = {
        "ours DDIM 50": lambda: pipe(prompt=prompts, sampler="ddim", steps=50, seed=0, batch_size=64,
                                     output_type="tensor"),
        "diffusers DDIMScheduler 50": lambda: diffusers_sample(
            pipe, DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **common), prompts, 50, 0),
        "ours DPM-Solver++(2M) 20": lambda: pipe(prompt=prompts, sampler="dpmpp_2m", steps=20, seed=0, batch_size=64,
                                                 output_type="tensor"),
        "diffusers DPMSolverMultistep 20": lambda: diffusers_sample(
            pipe, DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common), prompts, 20, 0),
    }
    rows, outputs = [], {}
    with torch.no_grad():
        for name, fn in runs.items():
            fn()  # warm-up
            start = time.perf_counter()
            outputs[name] = fn()
            sec = time.perf_counter() - start
            rows.append({"sampler": name, "64 images (s)": f"{sec:.2f}", "images/s": f"{64 / sec:.1f}"})
            print(rows[-1], flush=True)
    for ours, theirs in (("ours DDIM 50", "diffusers DDIMScheduler 50"),
                         ("ours DPM-Solver++(2M) 20", "diffusers DPMSolverMultistep 20")):
        diff = (outputs[ours] - outputs[theirs]).abs().max().item()
        for r in rows:
            if r["sampler"] in (ours, theirs):
                r["max |ours - diffusers| (pixels, [-1, 1])"] = f"{diff:.1e}"

    judge = judge_from_args(args)
    quality = []
    for sampler in ("ddim", "dpmpp_2m"):
        for steps in args.quality_steps:
            scores = judge(pipe, sampler=sampler, steps=steps, cfg_scale=4.0, seed=args.seed)
            quality.append({"sampler": sampler, "steps": steps,
                            "FID (classifier features)": f"{scores['fid_classifier']:.3f}",
                            "class accuracy": f"{100 * scores['class_accuracy']:.1f}%"})
            print(quality[-1], flush=True)
    body = (f"Model {args.model}. Wall time: 64 images incl. decoding, cfg 4, batch 64, after one warm-up run.\n\n"
            + markdown_table(rows, list(rows[0]))
            + f"\n\nQuality vs steps: {args.num_samples} samples for the conditions of the first {args.num_samples} "
            f"test images, cfg 4, seed {args.seed}; FID against those images in the Fashion-MNIST classifier's "
            "feature space.\n\n" + markdown_table(quality, list(quality[0])))
    path = write_result("sampling", "Sampling: speed and quality vs steps", body)
    print(body, f"\nwritten to {path}", sep="\n")


if __name__ == "__main__":
    main()
