"""Per-class accuracy of a model's samples, judged by the offline Fashion-MNIST classifier.

    python scripts/class_accuracy.py --model exports/ldm_f8 --per-class 100 --cfg 4

Samples --per-class images of each class (its caption for a text model, its label for a class model) with the
given sampler, steps and guidance, and prints (and with --out writes) a table: overall accuracy, then per class.
Needs exports/fashion_classifier (python scripts/train_classifier.py).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ldm.checkpoints import load_classifier
from ldm.evaluation.report import markdown_table
from ldm.evaluation.samples import per_class_accuracy
from ldm.pipeline import LatentDiffusionPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="exports/ldm_f8", help="an export folder or a stage-2 .ckpt")
    parser.add_argument("--classifier", default="exports/fashion_classifier")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--cfg", type=float, nargs="+", default=[4.0], help="guidance scales (one row each)")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    pipe, classifier = LatentDiffusionPipeline.from_pretrained(args.model), load_classifier(args.classifier)
    rows = []
    for scale in args.cfg:
        start = time.perf_counter()
        acc = per_class_accuracy(pipe, classifier, args.per_class, sampler=args.sampler, steps=args.steps,
                                 cfg_scale=scale, seed=args.seed)
        rows.append({"cfg scale": f"{scale:g}"} | {k: f"{100 * v:.1f}" for k, v in acc.items()}
                    | {"seconds": f"{time.perf_counter() - start:.0f}"})
    table = (f"{args.model}: {args.per_class} samples per class, {args.sampler} {args.steps} steps, seed {args.seed}"
             f"; accuracy in %\n\n" + markdown_table(rows, list(rows[0])))
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
