"""Class accuracy of generated samples vs classifier-free guidance scale (the offline quality metric).

    python scripts/class_accuracy.py --model exports/ldm_f8 --scales 1 2 4 --per-class 100

For each scale it draws `--per-class` samples per class prompt and prints (and writes as Markdown) the
fraction the Fashion-MNIST classifier (scripts/train_classifier.py) puts in the prompted class.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ldm.checkpoints import load_classifier
from ldm.data.fashion_mnist import CLASS_NAMES
from ldm.evaluation.samples import class_accuracy
from ldm.pipeline import LatentDiffusionPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="exports/ldm_f8", help="exported folder or .ckpt")
    parser.add_argument("--classifier", default="exports/fashion_classifier")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the table to this Markdown file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    classifier = load_classifier(args.classifier)
    header = "| cfg scale | accuracy | " + " | ".join(CLASS_NAMES) + " | seconds |"
    lines = [header, "|" + "---|" * (len(CLASS_NAMES) + 3)]
    for scale in args.scales:
        start = time.perf_counter()
        acc = class_accuracy(pipe, classifier, args.per_class, scale, args.sampler, args.steps, args.seed)
        secs = time.perf_counter() - start
        lines.append(f"| {scale:g} | {100 * acc['accuracy']:.1f}% | "
                     + " | ".join(f"{100 * acc[n]:.0f}" for n in CLASS_NAMES) + f" | {secs:.0f} |")
        print(lines[-1], flush=True)
    table = (f"{args.model}: {args.per_class} samples per class, {args.sampler} {args.steps} steps, "
             f"seed {args.seed}\n\n" + "\n".join(lines))
    print("\n" + table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
