"""The downsampling-factor ablation as a report: reconstruction, generation and throughput vs f.

    python train.py -m experiment=ae_f4,ae_f8,ae_f16            # stage 1 for each f  -> exports/ae_f*
    python train.py -m experiment=ldm_f4,ldm_f8,ldm_f16          # stage 2 on each     -> exports/ldm_f*
    python scripts/ablation_report.py --fs 4 8 16                # -> reports/ablation_f/

It reads the exported runs (weights, resolved config and training metadata), evaluates each on the
same test images and writes ablation_f.{md,csv} and three plots: reconstruction PSNR / SSIM / rFID
vs f, generation FID / class accuracy (/ CLIP score) vs f, and training throughput vs f. FID and
rFID are in the --extractor feature space (offline classifier by default; not comparable to
Inception FIDs). A missing stage-2 export leaves its columns empty.
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
    args = parser.parse_args()
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
            scores = judge(pipe, cfg_scale=args.cfg_scale, **sampling_from_args(args))
            row |= {"UNet params (M)": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 2),
                    "LDM img/s": throughput(ldm_cfg["metadata"]),
                    "FID": round(scores.get(f"fid_{args.extractor}", float("nan")), 3),
                    "class acc %": round(100 * scores["class_accuracy"], 2) if "class_accuracy" in scores else None,
                    "CLIP score": round(scores["clip_score"], 2) if "clip_score" in scores else None}
        else:
            log.warning("no stage-2 export at %s: generation columns left empty", ldm_dir)
        log.info("%s", row)
        rows.append(row)

    columns = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{c: r.get(c) for c in columns} for r in rows]
    preamble = (f"Exports {args.exports}/{args.ae_prefix}<f> and {args.ldm_prefix}<f>. Reconstructions: posterior "
                f"mode of the first {args.recon_images} images of {args.reference}. Generation: one sample per "
                f"condition of the first {args.num_samples} of them, {args.sampler} {args.steps} steps, cfg "
                f"{args.cfg_scale:g}, seed {args.seed}. FID/rFID feature space: {args.extractor}. "
                "img/s: training images per second of fit wall time.")
    md = write_table(rows, args.out, "ablation_f", "Ablation over the downsampling factor f", preamble)
    fs = [float(f) for f in args.fs]

    def series(keys: list[str]) -> dict[str, list]:
        return {k: [r.get(k) for r in rows] for k in keys if any(r.get(k) is not None for r in rows)}

    plots = [line_plot(Path(args.out) / "reconstruction_vs_f.png", fs,
                       series(["PSNR", "SSIM", "rFID", "label agreement %"]), "f", "Reconstruction vs f", log2_x=True)]
    gen = series(["FID", "class acc %", "CLIP score"])
    if gen:
        plots.append(line_plot(Path(args.out) / "generation_vs_f.png", fs, gen, "f", "Generation vs f", log2_x=True))
    plots.append(line_plot(Path(args.out) / "throughput_vs_f.png", fs, series(["AE img/s", "LDM img/s"]), "f",
                           "Training throughput vs f", log2_x=True))
    print(md.read_text())
    print("written:", md, md.with_suffix(".csv"), *plots)


if __name__ == "__main__":
    main()
