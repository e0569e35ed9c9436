"""Sample quality vs classifier-free guidance scale for one model: the trade-off curve papers report.

    python scripts/guidance_sweep.py --model exports/ldm_f8 --scales 1 2 3 4 6 8 --num-samples 1000

For each scale it generates one sample per reference condition (captions/labels of the first
--num-samples test images) and reports FID against those images (offline classifier features by
default; --extractor inception for the standard FID), the classifier's accuracy on the prompted
classes and, with --clip-arch, CLIP score. Writes <out>/guidance_sweep.{md,csv,png}.
"""

from __future__ import annotations

import argparse
import logging
import time

from ldm.evaluation.cli import add_judge_args, judge_from_args, sampling_from_args
from ldm.evaluation.report import line_plot, write_table
from ldm.pipeline import LatentDiffusionPipeline

log = logging.getLogger("guidance_sweep")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="exports/ldm_f8", help="exported folder or .ckpt")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0, 6.0, 8.0])
    parser.add_argument("--out", default="reports/guidance_sweep")
    add_judge_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    judge = judge_from_args(args)
    rows = []
    for scale in args.scales:
        start = time.perf_counter()
        scores = judge(pipe, cfg_scale=scale, **sampling_from_args(args))
        row = {"cfg scale": f"{scale:g}"} | {k: round(v * 100, 2) if k == "class_accuracy" else round(v, 3)
                                            for k, v in scores.items()}
        row["seconds"] = round(time.perf_counter() - start)
        rows.append(row)
        log.info("%s", row)
    preamble = (f"Model {args.model}; {args.num_samples} samples per scale for the conditions of the first "
                f"{args.num_samples} images of {args.reference}; {args.sampler}, {args.steps} steps, seed "
                f"{args.seed}. FID feature space: {args.extractor}. class_accuracy in %.")
    md = write_table(rows, args.out, "guidance_sweep", "Sample quality vs guidance scale", preamble)
    metrics = [k for k in rows[0] if k not in ("cfg scale", "seconds")]
    png = line_plot(md.with_suffix(".png"), args.scales, {k: [r[k] for r in rows] for k in metrics},
                    "cfg scale", f"{args.model}: guidance trade-off")
    print(md.read_text())
    print(f"written: {md}, {md.with_suffix('.csv')}, {png}")


if __name__ == "__main__":
    main()
