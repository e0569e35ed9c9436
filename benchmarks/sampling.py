"""Sampling: wall time for 64 images and quality vs steps, our samplers vs diffusers' schedulers.

    python benchmarks/sampling.py --model exports/ldm_f8
    python benchmarks/sampling.py --model exports/ldm_f8 --speed-only   # -> sampling_speed.md

Wall time: 64 images (the ten class prompts cycled), cfg 4, our DDIM 50 and DPM-Solver++(2M) 20
vs diffusers' DDIMScheduler 50 and DPMSolverMultistepScheduler 20 stepping the same guided U-Net, and our
DPM-Solver++(2M) 20 with guidance in --interval only (decoding included); medians of --rounds runs timed in
alternation. Quality vs steps:
--num-samples samples for the conditions of that many test images, FID in the offline classifier's
feature space and class accuracy, for DDIM and DPM++ at --quality-steps; shows where each converges.
DDIM at the most steps and DPM++ at --fast-steps run with a second seed too: the seed-to-seed spread
is the noise their gap is judged against.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_smoke_arg,
    interleaved_medians,
    make_smoke_pipeline,
    markdown_table,
    smoke_dir,
    write_result,
)

from ldm.data.fashion_mnist import caption_for  # noqa: E402
from ldm.diffusion.guidance import cfg, guides_at  # noqa: E402
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
    parser.add_argument("--quality-steps", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--fast-steps", type=int, default=20, help="DPM-Solver++ steps compared with DDIM at the most")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each sampler (median reported)")
    parser.add_argument("--interval", type=float, nargs=2, default=[0.5, 3.0], metavar=("LO", "HI"),
                        help="a guidance interval to time DPM-Solver++ with too (sigma in (LO, HI])")
    parser.add_argument("--speed-only", action="store_true",
                        help="wall times only (no quality sweep, no classifier needed); writes sampling_speed.md")
    add_judge_args(parser)
    parser.set_defaults(num_samples=500)
    add_smoke_arg(parser)
    args = parser.parse_args()
    smoke = smoke_dir(args)
    n_images, steps = (64, {"ddim": 50, "dpm": 20}) if not smoke else (4, {"ddim": 3, "dpm": 2})
    if smoke:  # a tiny random model, the timing part only
        args.model, args.rounds, args.speed_only = str(make_smoke_pipeline(smoke / "ldm_smoke")), 1, True
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    pipe = LatentDiffusionPipeline.from_pretrained(args.model, guide=None)  # the samplers alone, as diffusers runs them
    sch = pipe.config["schedule"]
    common = dict(num_train_timesteps=sch["num_timesteps"], beta_start=sch["beta_start"], beta_end=sch["beta_end"],
                  beta_schedule=sch["kind"], timestep_spacing=pipe.spacing,
                  rescale_betas_zero_snr=sch.get("zero_terminal_snr", False),
                  prediction_type={"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[pipe.prediction])
    prompts = [caption_for(i % 10) for i in range(n_images)]
    ddim, dpm = steps["ddim"], steps["dpm"]
    names = {"ours DDIM": f"ours DDIM {ddim}", "diffusers DDIM": f"diffusers DDIMScheduler {ddim}",
             "ours DPM": f"ours DPM-Solver++(2M) {dpm}", "diffusers DPM": f"diffusers DPMSolverMultistep {dpm}"}
    runs = {
        names["ours DDIM"]: lambda: pipe(prompt=prompts, sampler="ddim", steps=ddim, seed=0, batch_size=n_images,
                                         cfg_scale=4.0, guidance_interval=None, output_type="tensor"),
        names["diffusers DDIM"]: lambda: diffusers_sample(
            pipe, DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **common), prompts, ddim, 0),
        names["ours DPM"]: lambda: pipe(prompt=prompts, sampler="dpmpp_2m", steps=dpm, seed=0, batch_size=n_images,
                                        cfg_scale=4.0, guidance_interval=None, output_type="tensor"),
        names["diffusers DPM"]: lambda: diffusers_sample(
            pipe, DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common), prompts, dpm,
            0),
    }
    levels = pipe.noise_levels("dpmpp_2m", dpm)
    guided = sum(guides_at(a, tuple(args.interval)) for a in levels.abar[:-1])
    interval_name = (f"ours DPM-Solver++(2M) {dpm}, guidance in ({args.interval[0]:g}, {args.interval[1]:g}] "
                     f"({guided} of {dpm} steps)")
    runs[interval_name] = lambda: pipe(prompt=prompts, sampler="dpmpp_2m", steps=dpm, seed=0, batch_size=n_images,
                                       cfg_scale=4.0, output_type="tensor", guidance_interval=args.interval)
    outputs = {}

    def keeping_output(name, fn):
        return lambda: outputs.__setitem__(name, fn())

    with torch.no_grad():
        seconds = interleaved_medians({name: keeping_output(name, fn) for name, fn in runs.items()}, 1, args.rounds)
    rows = [{"sampler": name, f"{n_images} images (s)": f"{sec:.2f}", "images/s": f"{n_images / sec:.1f}"}
            for name, sec in seconds.items()]
    print(*rows, sep="\n", flush=True)
    for ours, theirs in ((names["ours DDIM"], names["diffusers DDIM"]),
                         (names["ours DPM"], names["diffusers DPM"])):
        diff = (outputs[ours] - outputs[theirs]).abs().max().item()
        for r in rows:
            if r["sampler"] in (ours, theirs):
                r["max |ours - diffusers| (pixels, [-1, 1])"] = f"{diff:.1e}"
    speed = (f"Model {args.model}. Wall time: {n_images} images incl. decoding, cfg 4, batch {n_images}; median of "
             f"{args.rounds} runs per sampler after one warm-up, the samplers timed in alternation. Outside a "
             "guidance interval a step runs the conditional half alone: one U-Net pass on half the batch.\n\n"
             + markdown_table(rows, list(rows[0])))
    if args.speed_only:
        path = write_result("sampling_speed", "Sampling speed", speed)
        print(speed, f"\nwritten to {path}", sep="\n")
        return

    judge = judge_from_args(args)
    quality, scores = [], {}
    for sampler in ("ddim", "dpmpp_2m"):
        for steps in args.quality_steps:
            scores[sampler, steps, args.seed] = judge(pipe, sampler=sampler, steps=steps, cfg_scale=4.0, seed=args.seed)
    # The noise floor: the same sampler and steps with another seed (fresh noise, same conditions).
    ref, fast = ("ddim", max(args.quality_steps)), ("dpmpp_2m", args.fast_steps)
    for key in (ref, fast):
        if (*key, args.seed) not in scores:
            scores[(*key, args.seed)] = judge(pipe, sampler=key[0], steps=key[1], cfg_scale=4.0, seed=args.seed)
        scores[(*key, args.seed + 1)] = judge(pipe, sampler=key[0], steps=key[1], cfg_scale=4.0, seed=args.seed + 1)
    for (sampler, steps, seed), sc in sorted(scores.items()):
        acc = sc["class_accuracy"]
        se = (acc * (1 - acc) / args.num_samples) ** 0.5
        quality.append({"sampler": sampler, "steps": steps, "seed": seed,
                         "FID (classifier features)": f"{sc['fid_classifier']:.3f}",
                         "class accuracy": f"{100 * acc:.1f}% ± {100 * se:.1f}"})
        print(quality[-1], flush=True)

    def mean(key, metric):
        return (scores[(*key, args.seed)][metric] + scores[(*key, args.seed + 1)][metric]) / 2

    fid_noise = max(abs(scores[(*k, args.seed)]["fid_classifier"] - scores[(*k, args.seed + 1)]["fid_classifier"])
                    for k in (ref, fast))
    fid_gap = abs(mean(fast, "fid_classifier") - mean(ref, "fid_classifier"))
    acc_gap = abs(mean(fast, "class_accuracy") - mean(ref, "class_accuracy"))
    # Standard error of a difference of two 2-seed means of binomial accuracies (2 * num_samples each).
    p = mean(ref, "class_accuracy")
    acc_se = (2 * p * (1 - p) / (2 * args.num_samples)) ** 0.5
    within = fid_gap <= fid_noise and acc_gap <= 2 * acc_se
    verdict = (f"DPM-Solver++(2M) {args.fast_steps} vs DDIM {ref[1]} (means over seeds {args.seed} and "
               f"{args.seed + 1}): FID gap {fid_gap:.3f} vs seed-to-seed FID spread {fid_noise:.3f}; class-accuracy "
               f"gap {100 * acc_gap:.1f} points vs 2 standard errors {200 * acc_se:.1f} -> "
               + ("within noise." if within else "NOT within noise."))
    print(verdict, flush=True)
    body = (speed + f"\n\nQuality vs steps: {args.num_samples} samples for the conditions of the first "
            f"{args.num_samples} test images, cfg 4; FID against those images in the Fashion-MNIST classifier's "
            "feature space; class accuracy ± its binomial standard error.\n\n"
            + markdown_table(quality, list(quality[0])) + f"\n\n{verdict}")
    path = write_result("sampling", "Sampling: speed and quality vs steps", body)
    print(body, f"\nwritten to {path}", sep="\n")


if __name__ == "__main__":
    main()
