"""The downsampling-factor ablation as a report: reconstruction, generation and throughput vs f.

    python train.py -m experiment=ae_f4,ae_f8,ae_f16            # stage 1 for each f  -> exports/ae_f*
    python train.py -m experiment=ldm_f4,ldm_f8,ldm_f16          # stage 2 on each     -> exports/ldm_f*
    python scripts/ablation_report.py --fs 4 8 16 --seeds 0 1    # -> reports/ablation_f/

It reads the exported runs (weights, resolved config and training metadata), evaluates each on the
same test images and writes ablation_f.{md,csv} and three plots: reconstruction PSNR / SSIM / rFID
vs f, generation FID / class accuracy (/ CLIP score) vs f, and training throughput vs f. Generation
is repeated for each of --seeds (the sampling noise): the table gives the mean, the spread (max - min)
and each seed's value. FID and rFID are in the --extractor feature space (offline classifier by
default; not comparable to Inception FIDs). A missing stage-2 export leaves its columns empty.

The report ends with its findings: whether PSNR falls monotonically as f grows, and whether the samples
are above chance for the classifier at every f. Where every model's samples are within 2x of chance the
budget was too short to compare generation across f: the report says so and draws no generation plot.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from torchmetrics.image.fid import FrechetInceptionDistance

from ldm.checkpoints import LATENT_DIFFUSION, load_classifier, load_first_stage, read_export_config
from ldm.evaluation.cli import add_judge_args, judge_from_args, reference_batches, sampling_from_args
from ldm.evaluation.features import build_extractor
from ldm.evaluation.reconstruction import evaluate_reconstruction
from ldm.evaluation.report import line_plot, write_table
from ldm.pipeline import LatentDiffusionPipeline

log = logging.getLogger("ablation_report")


def throughput(metadata: dict) -> float | None:
    images, seconds = metadata.get("fit_images"), metadata.get("fit_seconds")
    return round(images / seconds, 1) if images and seconds else None


def seed_stats(values: list[float], digits: int) -> tuple[float, float, str]:
    """Mean, spread (max - min) and the per-seed values joined by ' / '."""
    mean = sum(values) / len(values)
    return round(mean, digits), round(max(values) - min(values), digits), " / ".join(f"{v:.{digits}f}" for v in values)


def generation_columns(per_seed: list[dict]) -> dict:
    """The generation columns of one f from the scores of each seed."""
    row = {}
    for key, name, scale, digits in (("fid", "FID", 1, 2), ("class_accuracy", "class acc %", 100, 1),
                                      ("clip_score", "CLIP score", 1, 2)):
        values = [scores[key] * scale for scores in per_seed if key in scores]
        if values:
            mean, spread, each = seed_stats(values, digits)
            row |= {name: mean, f"{name} spread": spread, f"{name} per seed": each}
    return row


def findings(rows: list[dict], chance: float) -> tuple[list[str], bool]:
    """Sentences stating what the table shows, and whether the generation columns rise above noise."""
    lines = []
    psnr = [(r["f"], r["PSNR"]) for r in rows]
    if len(psnr) > 1:
        falls = all(a[1] > b[1] for a, b in zip(psnr, psnr[1:], strict=False))
        trail = " > ".join(f"{p:g}" for _, p in psnr)
        lines.append(f"PSNR {'falls' if falls else 'does NOT fall'} monotonically as f grows ({trail} dB).")
    accs = [(r["f"], r.get("class acc %")) for r in rows if r.get("class acc %") is not None]
    informative = any(a >= 2 * chance for _, a in accs)
    if accs and not informative:
        lines.append(f"Every model's samples are within 2x of chance ({chance:g}% class accuracy): the training "
                     "budget was too short for the generation columns to say anything about f; no generation plot.")
    for f, acc in accs:
        if informative and acc < 2 * chance:
            lines.append(f"f={f}: samples near chance ({acc:g}% vs {chance:g}%) at this budget.")
    fids = [(r["FID"], r["f"]) for r in rows if r.get("FID") is not None]
    if informative and fids:
        best = min(fids)
        lines.append(f"Lowest sample FID at f={best[1]} ({best[0]:g}).")
    return lines, informative


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fs", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--exports", default="exports")
    parser.add_argument("--ae-prefix", default="ae_f", help="stage-1 exports are <exports>/<prefix><f>")
    parser.add_argument("--ldm-prefix", default="ldm_f", help="stage-2 exports are <exports>/<prefix><f>")
    parser.add_argument("--recon-images", type=int, default=2000, help="test images for the reconstruction metrics")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--out", default="reports/ablation_f")
    add_judge_args(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="sampling seeds, generation repeated for each (default: --seed)")
    args = parser.parse_args()
    seeds = args.seeds or [args.seed]
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    extractor = None if args.extractor == "none" else build_extractor(args.extractor, args.extractor_weights)
    classifier = None if args.classifier == "none" else load_classifier(args.classifier)
    judge = None
    rows = []
    for f in args.fs:
        ae_dir = Path(args.exports) / f"{args.ae_prefix}{f}"
        ae = load_first_stage(ae_dir)
        meta = ae.export_config["metadata"]
        fid = FrechetInceptionDistance(feature=extractor, normalize=True) if extractor is not None else None
        rec = evaluate_reconstruction(ae, reference_batches(args, args.recon_images), classifier, fid=fid)
        row = {"f": f, "latent": "x".join(str(d) for d in ae.latent_shape()),
               "AE params (M)": round(sum(p.numel() for p in ae.parameters()) / 1e6, 2),
               "AE img/s": throughput(meta), "PSNR": round(rec["psnr"], 2), "SSIM": round(rec["ssim"], 4),
               "rFID": round(rec["rfid"], 3) if "rfid" in rec else None,
               "label agreement %": round(100 * rec["agreement"], 2) if "agreement" in rec else None}
        ldm_dir = Path(args.exports) / f"{args.ldm_prefix}{f}"
        if (ldm_dir / "config.yaml").is_file():
            _, ldm_cfg = read_export_config(ldm_dir, LATENT_DIFFUSION)
            pipe = LatentDiffusionPipeline.from_pretrained(ldm_dir)
            judge = judge or judge_from_args(args)
            per_seed = []
            for seed in seeds:
                scores = judge(pipe, cfg_scale=args.cfg_scale, **(sampling_from_args(args) | {"seed": seed}))
                if f"fid_{args.extractor}" in scores:
                    scores["fid"] = scores.pop(f"fid_{args.extractor}")
                per_seed.append(scores)
            row |= {"UNet params (M)": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 2),
                    "LDM img/s": throughput(ldm_cfg["metadata"])} | generation_columns(per_seed)
        else:
            log.warning("no stage-2 export at %s: generation columns left empty", ldm_dir)
        log.info("%s", row)
        rows.append(row)

    columns = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{c: r.get(c) for c in columns} for r in rows]
    preamble = (f"Exports {args.exports}/{args.ae_prefix}<f> and {args.ldm_prefix}<f>. Reconstructions: posterior "
                f"mode of the first {args.recon_images} images of {args.reference}. Generation: one sample per "
                f"condition of the first {args.num_samples} of them, {args.sampler} {args.steps} steps, cfg "
                f"{args.cfg_scale:g}, seeds {', '.join(map(str, seeds))} (mean, spread = max - min, and each seed). "
                f"FID/rFID feature space: {args.extractor}. img/s: training images per second of fit wall time.")
    chance = 100 / (classifier.head.out_features if classifier is not None else 10)
    notes, informative = findings(rows, chance)
    md = write_table(rows, args.out, "ablation_f", "Ablation over the downsampling factor f", preamble)
    md.write_text(md.read_text() + "\n## Findings\n\n" + "".join(f"- {n}\n" for n in notes))
    fs = [float(f) for f in args.fs]

    def series(keys: list[str]) -> dict[str, list]:
        return {k: [r.get(k) for r in rows] for k in keys if any(r.get(k) is not None for r in rows)}

    plots = [line_plot(Path(args.out) / "reconstruction_vs_f.png", fs,
                       series(["PSNR", "SSIM", "rFID", "label agreement %"]), "f", "Reconstruction vs f", log2_x=True)]
    gen = series(["FID", "class acc %", "CLIP score"])
    if gen and informative:
        plots.append(line_plot(Path(args.out) / "generation_vs_f.png", fs, gen, "f", "Generation vs f", log2_x=True))
    plots.append(line_plot(Path(args.out) / "throughput_vs_f.png", fs, series(["AE img/s", "LDM img/s"]), "f",
                           "Training throughput vs f", log2_x=True))
    print(md.read_text())
    print("written:", md, md.with_suffix(".csv"), *plots)


if __name__ == "__main__":
    main()
