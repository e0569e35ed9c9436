"""Host allocator policy: training steps under glibc's default malloc vs ``host_allocator=retain``.

    python benchmarks/allocator.py --rounds 3     # -> benchmarks/results/allocator.md

The policy is process-wide and cannot be undone within a process, so each measurement runs in a fresh
child process, the two policies alternating round by round (this machine drifts 10-40%). A child times
our U-Net and autoencoder training steps (benchmarks/train_step.py's configs, fp32 and, where bf16 is
native, bf16-mixed) and diffusers' autoencoder with the identical architecture, in alternation, and
reports its page faults per step and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    SMOKE_ENV,
    add_smoke_arg,
    interleaved_medians,
    markdown_table,
    native_bf16,
    peak_rss_mb,
    smoke_dir,
    write_result,
)

POLICIES = ("default", "retain")


def child(policy: str, iters: int) -> dict:
    from ldm.utils.allocator import apply_policy

    applied = apply_policy(policy)
    from diffusers import AutoencoderKL as DiffusersVAE
    from train_step import AE, UNET, train_step, unet_loss, vae_loss

    from ldm.interop.diffusers import save_diffusers_folder
    from ldm.networks.autoencoder import AutoencoderKL
    from ldm.networks.unet import UNet

    torch.manual_seed(0)
    unet, vae = UNet(**UNET), AutoencoderKL(**AE)
    folder = Path(os.environ.get(SMOKE_ENV, "/tmp")) / f"ldm_bench_allocator/{policy}"
    theirs = DiffusersVAE.from_pretrained(save_diffusers_folder(vae, folder))
    nu, na = (2, 2) if SMOKE_ENV in os.environ else (32, 16)  # --smoke: tiny batches
    x, t, ctx = torch.randn(nu, 4, 8, 8), torch.randint(0, 1000, (nu,)), torch.randn(nu, 77, 128)
    img = torch.rand(na, 3, 64, 64) * 2 - 1
    out = {"applied": applied}
    for precision in ["fp32"] + (["bf16-mixed"] if native_bf16() else []):
        ac = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
        opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True)
                for name, m in (("unet", unet), ("vae", vae), ("diffusers", theirs))}
        fns = {"U-Net": lambda o=opts, a=ac: train_step(unet_loss, unet, False, (x, t, ctx), o["unet"], a),
               "autoencoder": lambda o=opts, a=ac: train_step(vae_loss, vae, False, (img,), o["vae"], a),
               "diffusers autoencoder": lambda o=opts, a=ac: train_step(vae_loss, theirs, True, (img,),
                                                                        o["diffusers"], a)}
        faults = {}
        for name, fn in fns.items():  # page faults per step, after a warm-up step
            fn()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fn()
            faults[name] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        times = interleaved_medians(fns, 1, iters)
        out[precision] = {name: {"ms": 1000 * times[name], "faults": faults[name]} for name in fns}
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=7, help="timed steps per candidate in each child")
    parser.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)
    add_smoke_arg(parser)
    args = parser.parse_args()
    if smoke_dir(args):  # children inherit the smoke folder through the environment
        args.rounds, args.iters = 1, 1
    if args.child:
        print(json.dumps(child(args.child, args.iters)))
        return
    results: dict[str, list[dict]] = {p: [] for p in POLICIES}
    for r in range(args.rounds):
        for policy in POLICIES:
            proc = subprocess.run([sys.executable, __file__, "--child", policy, "--iters", str(args.iters)],
                                  capture_output=True, text=True, check=True)
            results[policy].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {policy}: {results[policy][-1]}", flush=True)
    if not all(res["applied"] for res in results["retain"]):
        raise SystemExit("host_allocator=retain could not be applied here (not glibc?): nothing to compare")
    rows = []
    for precision in [k for k in results["default"][0] if k not in ("applied", "peak_rss_mb")]:
        for model in results["default"][0][precision]:
            med = {p: statistics.median(res[precision][model]["ms"] for res in results[p]) for p in POLICIES}
            faults = {p: statistics.median(res[precision][model]["faults"] for res in results[p]) for p in POLICIES}
            rows.append({"model": model, "precision": precision,
                         "default (ms)": f"{med['default']:.0f}", "retain (ms)": f"{med['retain']:.0f}",
                         "speed-up": f"{med['default'] / med['retain']:.2f}x",
                         "per round (default / retain ms)": ", ".join(
                             f"{d[precision][model]['ms']:.0f} / {r_[precision][model]['ms']:.0f}"
                             for d, r_ in zip(results["default"], results["retain"], strict=True)),
                         "page faults per step (default / retain)":
                             f"{faults['default']:.0f} / {faults['retain']:.0f}"})
    ratios = []
    for precision in dict.fromkeys(row["precision"] for row in rows):
        ours = {p: statistics.median(res[precision]["autoencoder"]["ms"] for res in results[p]) for p in POLICIES}
        theirs = {p: statistics.median(res[precision]["diffusers autoencoder"]["ms"] for res in results[p])
                  for p in POLICIES}
        ratios.append({"precision": precision, "both default": f"{theirs['default'] / ours['default']:.2f}x",
                       "both retain": f"{theirs['retain'] / ours['retain']:.2f}x",
                       "ours retain vs diffusers default": f"{theirs['default'] / ours['retain']:.2f}x"})
    rss = {p: statistics.median(res["peak_rss_mb"] for res in results[p]) for p in POLICIES}
    body = (f"{args.rounds} rounds; each round runs one child process per policy (policy applied first, "
            f"before any model is built), in turn. A child times the steps of benchmarks/train_step.py (fused "
            f"AdamW for all three, median of {args.iters}, the three in alternation). Medians over the rounds. "
            f"Peak RSS of a child (both precisions, all three models): default {rss['default']:.0f} MiB, "
            f"retain {rss['retain']:.0f} MiB.\n\n" + markdown_table(rows, list(rows[0]))
            + "\n\nAutoencoder step, diffusers' time over ours (speed-up), with both under the same policy, "
            "and ours under `retain` against diffusers under glibc's default (medians from different "
            "processes):\n\n" + markdown_table(ratios, list(ratios[0])))
    path = write_result("allocator", "Host allocator: glibc default vs host_allocator=retain", body)
    print(body, f"\nwritten to {path}", sep="\n")


if __name__ == "__main__":
    main()
