"""The paper recipes' sizes and what they cost: parameters and FLOPs per image counted on the meta device,
turned into images/s and GPU-days at a stated model-FLOPs utilisation (estimates until measured on a GPU).

    python benchmarks/recipes.py                               # H100 bf16 peak, MFU 6.9% (measured) and 28%
    python benchmarks/recipes.py --peak-tflops 312 --mfu 0.3   # an A100 at 30%

images/s per GPU = peak x MFU / FLOPs per training image. A training image costs forward + backward of the U-Net
(of the autoencoder and discriminator in stage 1, with LPIPS's VGG16), forward of what is frozen (the text tower;
the first-stage encoder, which a latent cache removes: both totals are given). GPU-days = the recipe's
trainer.max_steps x global batch / images/s. 6.9% is the last measured MFU of our SD-size U-Net step (H200, bf16,
batch 16, commit 928ffef); MosaicML's SD replication reports about 28% on A100s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_smoke_arg, markdown_table, smoke_dir, write_result  # noqa: E402

from ldm.recipes import PAPER, RECIPES, recipe_size  # noqa: E402


def giga(flops: float) -> str:
    return f"{flops / 1e9:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--mfu", type=float, nargs="+", default=[0.069, 0.28], help="utilisations to estimate at")
    add_smoke_arg(parser)
    args = parser.parse_args()
    if smoke_dir(args):
        args.recipes = ["kl_f4_256", "cin256_ldm8"]
    sizes_rows, cost_rows = [], []
    for name in args.recipes:
        size = recipe_size(name)
        published = PAPER.get(name)
        ours = size.counted(published.counts) if published else None
        sizes_rows.append({
            "recipe": name, "px": size.resolution,
            "parameters (M)": ", ".join(f"{k} {v / 1e6:.2f}" for k, v in size.params.items()),
            "trains (M)": f"{size.trainable / 1e6:.2f}",
            "published (M)": (f"{published.params / 1e6:.2f} ({published.counts}; {published.source}); ours "
                              f"{ours / 1e6:.2f}" if published else "none published"),
            "GFLOP / training image": " + ".join(f"{k} {giga(v)}" for k, v in size.train_flops.items()),
            "GFLOP / sampling step": giga(size.sample_step_flops) if size.sample_step_flops else "-",
            "GFLOP / decode": giga(size.decode_flops) if size.decode_flops else "-"})
        cached = size.train_flops_per_image - size.train_flops.get("encoder", 0)
        for mfu in args.mfu:
            rate = args.peak_tflops * 1e12 * mfu
            row = {"recipe": name, "MFU": f"{100 * mfu:.1f}%",
                   "img/s per GPU (online encode)": f"{rate / size.train_flops_per_image:,.0f}",
                   "img/s per GPU (latent cache)": f"{rate / cached:,.0f}" if "encoder" in size.train_flops else "-",
                   "GPU-hours per 1M images": f"{1e6 * size.train_flops_per_image / rate / 3600:,.1f}"}
            if size.max_steps and size.global_batch:
                images = size.max_steps * size.global_batch
                row["schedule"] = f"{size.max_steps:,} steps x {size.global_batch}"
                row["GPU-days (online / cache)"] = (f"{images * size.train_flops_per_image / rate / 86400:,.1f} / "
                                                    f"{images * cached / rate / 86400:,.1f}")
            else:
                row["schedule"], row["GPU-days (online / cache)"] = "none given", "-"
            cost_rows.append(row)
    body = ("Counted on the meta device (`ldm/recipes.py`, `torch.utils.flop_counter`, 2 FLOPs per multiply-add, the "
            "plain GPU paths), per image at the recipe's resolution.\n\n"
            + markdown_table(sizes_rows, list(sizes_rows[0]))
            + f"\n\nEstimated cost on a GPU with a {args.peak_tflops:.0f} TFLOP/s bf16 peak (estimates from the FLOP "
            "counts above, not measurements):\n\n" + markdown_table(cost_rows, list(cost_rows[0])))
    path = write_result("recipes", "Paper recipes: sizes and estimated cost", body)
    print(body, f"\nwritten to {path}", sep="\n")


if __name__ == "__main__":
    main()
