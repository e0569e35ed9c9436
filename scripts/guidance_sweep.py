"""Sample quality vs guidance for one model: cfg scale x guidance interval x CFG rescale x EMA width x autoguidance.

    python scripts/guidance_sweep.py --model exports/ldm_f8 --scales 1 1.5 2 3 4 --num-samples 500
    python scripts/guidance_sweep.py --model exports/ldm_f8 --scales 1 1.5 2 3 4 --intervals off 0.3,5 1,inf \\
        --run logs/ldm_f8/runs/<run> --sigma-rels 0.05 0.1 0.15 --num-samples 500
    python scripts/guidance_sweep.py --model exports/ldm_f8 --guide exports/ldm_f8/guide --autoguidance 1 2 2.5 \
        --scales 1 3 --intervals 0.5,3 --num-samples 500

For each setting it generates one sample per reference condition (captions/labels of the first --num-samples test
images) and reports FID against those images (offline classifier features by default; --extractor inception for
the standard FID), the classifier's accuracy on the prompted classes and, with --clip-arch, CLIP score.
--intervals: guidance only where sigma = sqrt((1-abar)/abar) lies in (lo, hi] ("lo,hi"; "off": every step);
--rescales: CFG rescale's phi; --sigma-rels: post-hoc EMA widths reconstructed from --run's snapshots (besides the
export's own EMA); --autoguidance: the weights w of --guide's model (autoguidance, Karras et al. 2024; 1: off).
--seeds: every setting repeated for each sampling seed, the table giving their mean (the front is of the means: a
500-sample evaluation moves by about 2 points of accuracy and 2 of FID from seed to seed) and each seed's scores.
Cfg 1 is no guidance: it is run once per EMA and autoguidance weight. The table marks the Pareto front (lower FID and
higher accuracy) and says, for every cfg of the plain setting (export EMA, no interval, no rescale), which other
setting beats it on both. Writes <out>/guidance_sweep.{md,csv,png} (the plot: accuracy against FID).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import time
from pathlib import Path

import torch

from ldm.evaluation.cli import add_judge_args, judge_from_args, sampling_from_args
from ldm.evaluation.pareto import dominates, pareto_front
from ldm.evaluation.report import pareto_plot, write_table
from ldm.pipeline import LatentDiffusionPipeline

log = logging.getLogger("guidance_sweep")
PLAIN = ("export", "off", 0.0, 1.0)


def parse_interval(text: str) -> tuple[float, float] | None:
    if text.lower() in ("off", "none"):
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"interval {text!r}: expected 'lo,hi' (0.3,5 or 1,inf) or 'off'") from None
    return lo, hi


def interval_name(interval: tuple[float, float] | None) -> str:
    if interval is None:
        return "off"
    return f"({interval[0]:g}, {'inf' if math.isinf(interval[1]) else f'{interval[1]:g}'}]"


def ema_variants(pipe: LatentDiffusionPipeline, args: argparse.Namespace):
    """(name, None) for the export's weights, then (name, weights) per reconstructed post-hoc EMA width."""
    if not args.skip_export_ema:
        yield "export", None
    if args.sigma_rels:
        from ldm.posthoc_ema import reconstruct, snapshot_folder

        for s in args.sigma_rels:
            weights, info = reconstruct(snapshot_folder(Path(args.run)), s)
            log.info("post-hoc EMA sigma_rel %g: step %d, %d snapshots, profile error %.2f%%", s, info["step"],
                     info["snapshots"], 100 * info["profile_error"])
            yield f"sigma_rel {s:g}", weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="exports/ldm_f8", help="exported folder or .ckpt")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--intervals", type=parse_interval, nargs="+", default=[None])
    parser.add_argument("--rescales", type=float, nargs="+", default=[0.0])
    parser.add_argument("--run", default=None, help="the model's run folder, for --sigma-rels")
    parser.add_argument("--sigma-rels", type=float, nargs="*", default=[])
    parser.add_argument("--skip-export-ema", action="store_true", help="only the --sigma-rels widths")
    parser.add_argument("--guide", default=None, help="autoguidance's guide model (exported folder or .ckpt; 'auto': "
                        "the model's guide/); without it the model's own guide is not loaded")
    parser.add_argument("--autoguidance", type=float, nargs="+", default=[1.0], help="weights w for --guide")
    parser.add_argument("--merge", nargs="+", default=None, metavar="CSV",
                        help="tabulate the rows of earlier sweeps' guidance_sweep.csv files together (no sampling)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="sampling seeds, every setting repeated for each: the mean in the usual columns, each "
                             "seed's scores in the 'per seed' ones (default: --seed)")
    parser.add_argument("--out", default="reports/guidance_sweep")
    add_judge_args(parser)
    args = parser.parse_args()
    if args.sigma_rels and not args.run:
        parser.error("--sigma-rels needs --run (the folder whose posthoc_ema/ snapshots to reconstruct from)")
    if any(w != 1.0 for w in args.autoguidance) and not args.guide:
        parser.error("--autoguidance other than 1 needs --guide (the guide model: experiment=ldm_f8_guide)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rows = read_rows(args.merge) if args.merge else sweep(args)
    findings, png = pareto_findings(rows, args)
    seeds = args.seeds or [args.seed]
    seeds_text = (f"seed {seeds[0]}" if len(seeds) == 1 else
                  f"seeds {', '.join(map(str, seeds))} (their mean; each seed's scores in the per-seed columns)")
    preamble = (f"Model {args.model}; {args.num_samples} samples per setting for the conditions of the first "
                f"{args.num_samples} images of {args.reference}; {args.sampler}, {args.steps} steps, {seeds_text}. "
                f"FID feature space: {args.extractor}. class_accuracy in %. interval: guidance only where "
                "sigma = sqrt((1-abar)/abar) is in it. autoguidance: the weight of the guide model "
                f"({args.guide or 'none'}; 1: off). pareto: not beaten on both FID and accuracy by another row."
                + findings)
    md = write_table(rows, args.out, "guidance_sweep", "Sample quality vs guidance", preamble)
    print(md.read_text())
    print(f"written: {md}, {md.with_suffix('.csv')}" + (f", {png}" if png else ""))


def read_rows(paths: list[str]) -> list[dict]:
    """The rows of earlier sweeps' CSV files, numbers as numbers (their pareto column recomputed)."""
    import csv

    rows, seen = [], set()
    for path in paths:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                row.pop("pareto", None)
                row = {"EMA": "export", "interval": "off", "rescale": "0", "autoguidance": "1"} | row  # older sweeps
                for key in row:
                    if key.startswith(("fid", "class_accuracy", "clip")):
                        row[key] = float(row[key])
                setting = (row["EMA"], row["interval"], row["rescale"], row["autoguidance"], row["cfg scale"])
                if setting not in seen:  # a setting measured twice: its first row
                    seen.add(setting)
                    rows.append(row)
    return rows


def _rounded(key: str, value: float) -> float:
    return round(value * 100, 2) if key == "class_accuracy" else round(value, 3)


def sweep(args: argparse.Namespace) -> list[dict]:
    seeds = args.seeds or [args.seed]
    pipe = LatentDiffusionPipeline.from_pretrained(args.model, guide=args.guide)
    judge = judge_from_args(args)
    trained = {**{f"unet.{k}": v for k, v in pipe.unet.state_dict().items()},
               **{f"conditioner.{k}": v for k, v in pipe.conditioner.state_dict().items()}}
    export_weights = {k: v.clone() for k, v in trained.items()}
    rows = []
    for ema, weights in ema_variants(pipe, args):
        with torch.no_grad():
            for name, value in (weights or export_weights).items():
                trained[name].copy_(value)
        for interval, phi, w, scale in itertools.product(args.intervals, args.rescales, args.autoguidance,
                                                         args.scales):
            if scale == 1.0 and (interval is not None or phi != 0.0):
                continue  # no classifier-free guidance: the same samples as cfg 1 without interval or rescale
            start = time.perf_counter()
            per_seed = [judge(pipe, cfg_scale=scale, guidance_interval=interval, guidance_rescale=phi,
                              autoguidance=w, **(sampling_from_args(args) | {"seed": seed})) for seed in seeds]
            row = {"EMA": ema, "interval": interval_name(interval), "rescale": f"{phi:g}", "autoguidance": f"{w:g}",
                   "cfg scale": f"{scale:g}"} | {k: _rounded(k, sum(p[k] for p in per_seed) / len(seeds))
                                                 for k in per_seed[0]}
            if len(seeds) > 1:  # not a column read_rows turns into a number: "per seed" starts none of theirs
                row |= {f"per seed: {k}": " / ".join(f"{_rounded(k, p[k]):g}" for p in per_seed) for k in per_seed[0]}
            row["seconds"] = round(time.perf_counter() - start)
            rows.append(row)
            log.info("%s", row)
    return rows


def pareto_findings(rows: list[dict], args: argparse.Namespace) -> tuple[str, object]:
    """Marks the Pareto front in ``rows``, says which setting beats each cfg of the plain one, draws the plot."""
    fid_key = next((k for k in rows[0] if k.startswith("fid")), None) if rows else None
    if fid_key is None:
        return "", None
    points = [(r[fid_key], r.get("class_accuracy", 0.0)) for r in rows]
    front = pareto_front(points)
    for i, r in enumerate(rows):
        r["pareto"] = "yes" if i in front else ""
    lines = []
    for i, r in enumerate(rows):
        if (r["EMA"], r["interval"], float(r["rescale"]), float(r["autoguidance"])) != PLAIN:
            continue
        better = [j for j, p in enumerate(points) if dominates(p, points[i])]
        best = min(better, key=lambda j: points[j][0]) if better else None
        lines.append(f"- cfg {r['cfg scale']}: FID {points[i][0]:.2f}, accuracy {points[i][1]:.1f}% -> "
                     + (f"beaten by {rows[best]['EMA']}, interval {rows[best]['interval']}, rescale "
                        f"{rows[best]['rescale']}, autoguidance {rows[best]['autoguidance']}, cfg "
                        f"{rows[best]['cfg scale']} (FID {points[best][0]:.2f}, "
                        f"accuracy {points[best][1]:.1f}%)" if best is not None else "not beaten on both"))
    series: dict[str, list] = {}
    for r, p in zip(rows, points, strict=True):
        series.setdefault(f"{r['EMA']}, interval {r['interval']}, rescale {r['rescale']}, autoguidance "
                          f"{r['autoguidance']}", []).append(
            (p[0], p[1], r["cfg scale"]))
    png = pareto_plot(f"{args.out}/guidance_sweep.png", series, [points[i] for i in front],
                      f"{args.model}: accuracy vs FID")
    intro = "\n\nThe plain setting (export EMA, no interval, no rescale, no autoguidance) at each cfg:\n"
    return intro + "\n".join(lines), png

if __name__ == "__main__":
    main()
