"""FID (+ precision/recall) of a trained model against a real set: the evaluation protocol of the paper recipes.

    python scripts/evaluate.py --model exports/cin256_ldm4 --reference /data/imagenet/train_shards \\
        --cfg-scale 1.5 --sampler ddim --steps 250                   # 50k samples, Inception if its weights are here

The reference statistics (feature mean and covariance of the real images, their captions, up to --pr-features
features for precision/recall) are computed once and cached in --stats; a later run with the same reference,
resolution and extractor reads them, and one with other settings is refused. --num-samples samples (50,000 by
default: class labels balanced over the classes, or the reference captions for a text-to-image model) are
generated in chunks and only their feature sums are kept. Feature space: --extractor auto takes the FID
InceptionV3 (torch-fidelity's weights: its cache, or --extractor-weights FILE) when the file is present and the
offline classifier otherwise (--extractor-weights FOLDER, exports/fashion_classifier by default); the report names
the one used: FIDs from different feature spaces are not comparable. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from ldm.evaluation.features import build_extractor, resolve_inception_weights
from ldm.evaluation.protocol import compute_reference, evaluate, reference_stats
from ldm.evaluation.report import machine

log = logging.getLogger("evaluate")


def pick_extractor(choice: str, weights: str | None) -> str:
    if choice != "auto":
        return choice
    try:
        resolve_inception_weights(weights if weights and Path(weights).is_file() else None)
        return "inception"
    except FileNotFoundError:
        log.info("FID Inception weights not found: using the offline classifier's features")
        return "classifier"


def run(args: argparse.Namespace) -> dict:
    from ldm.data.loaders import ShardData
    from ldm.pipeline import LatentDiffusionPipeline

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.num_samples < 2:
        raise ValueError(f"--num-samples={args.num_samples}: FID needs at least 2 samples")
    pipe = LatentDiffusionPipeline.from_pretrained(args.model, device=device)
    resolution = args.resolution or pipe.first_stage.resolution
    extractor_name = pick_extractor(args.extractor, args.extractor_weights)
    extractor = build_extractor(extractor_name, args.extractor_weights).to(device).eval()
    source = {"reference": str(args.reference), "resolution": resolution, "limit": args.reference_limit,
              "extractor": extractor.description, "pr_features": args.pr_features}
    stats_path = args.stats or (Path("reports/fid_stats") / f"{Path(args.reference).name}_{extractor_name}_"
                                f"{resolution}px_{args.reference_limit or 'all'}.pt")

    def compute():
        data = ShardData(train_shards=args.reference, val_shards=args.reference, resolution=resolution,
                         val_batch_size=args.batch_size, num_workers=args.workers, val_limit=args.reference_limit,
                         required_keys=("image",))
        return compute_reference(data.val_dataloader(), extractor, args.reference_limit, args.pr_features, source,
                                 device)

    stats = reference_stats(stats_path, source, compute)
    sampling = {"sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg_scale, "seed": args.seed,
                "guidance_interval": args.guidance_interval, "guidance_rescale": args.guidance_rescale}
    scores = evaluate(pipe, stats, extractor, args.num_samples, sampling=sampling, batch_size=args.batch_size,
                      keep=args.pr_features, k=args.k, device=device)
    return {"model": str(args.model), "extractor": extractor.description, "stats": str(stats_path),
            "machine": machine()} | sampling | scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an exported stage-2 folder (or .ckpt)")
    parser.add_argument("--reference", required=True, help="shards of the real images (folder, list or braces)")
    parser.add_argument("--reference-limit", type=int, default=None, help="first N reference images (default: all)")
    parser.add_argument("--stats", default=None, help="the reference statistics cache (default: reports/fid_stats/"
                                                      "<reference>_<extractor>_<px>px_<limit>.pt)")
    parser.add_argument("--num-samples", type=int, default=50_000)
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's")
    parser.add_argument("--extractor", default="auto", choices=["auto", "inception", "classifier"])
    parser.add_argument("--extractor-weights", default=None,
                        help="Inception weights file, or the classifier's export folder")
    parser.add_argument("--pr-features", type=int, default=10_000,
                        help="features per side for precision/recall (0: no precision/recall)")
    parser.add_argument("--k", type=int, default=3, help="k-th neighbour radius of precision/recall")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="guidance only where sigma = sqrt((1-abar)/abar) is in (LO, HI] (default: every step)")
    parser.add_argument("--guidance-rescale", type=float, default=0.0, help="CFG rescale's phi (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="loader processes for the reference images")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="report path without suffix (default: reports/evaluate/<model>)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = run(args)
    except (ValueError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    out = Path(args.out or f"reports/evaluate/{Path(args.model).name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    pr = (f", precision {report['precision']:.3f}, recall {report['recall']:.3f}" if "precision" in report else "")
    line = (f"FID {report['fid']:.2f}{pr} ({report['num_samples']} samples vs {report['reference_images']} reference "
            f"images; {report['extractor']}; {args.sampler} x {args.steps}, cfg {args.cfg_scale:g})")
    out.with_suffix(".md").write_text(f"# {args.model}\n\nMachine: {report['machine']}\n\n{line}\n")
    print(line)
    print(f"written: {out.with_suffix('.json')}, {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
