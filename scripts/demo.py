"""The demo, planned for this machine: data, stage 1, latent cache, stage 2, a sample grid and a per-class
accuracy table, within a deadline (30 minutes by default).

    python scripts/demo.py                 # what `make demo` runs
    python scripts/demo.py --minutes 45    # a longer demo: both training budgets grow
    make demo                              # the same, its deadline counted from make's start (--since)

It writes the Fashion-MNIST shards, then measures this machine in under a minute (ldm.demo.probe: both
stages' training steps, the encoder, sampling, the classifier) and plans every part from those rates
(ldm.demo.plan): how long each stage trains, how many images the latent cache encodes, what sampling
and the closing evaluation cost. It prints the plan, runs each part as its own command (the same
`train.py` / `sample.py` commands a researcher would type, with the planned budgets as overrides) —
the judge classifier first, when there is none yet — sizes the cache from the time actually left once
stage 1 is done, gives stage 2 all that is left once the cache is built, and ends with the time each part took,
the grid's path and the per-class accuracy of 500 samples at the default guidance. After stage 2, a share of its
time trains autoguidance's guide (experiment=ldm_f8_guide, exported into exports/ldm_f8/guide), so the grid and
the table sample at the guided defaults, where the model still gets enough steps for the guide to help (the plan
says when it does not); --guide-share 0 skips it. The plan and the
outcome are also written to <root>/logs/demo/<date>.md. Run outputs go where train.py puts them
(LDM_ROOT or the working directory).
"""

from __future__ import annotations

import time

START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

from hydra.utils import instantiate  # noqa: E402

from ldm.demo.plan import (  # noqa: E402
    DemoPlan,
    Part,
    PlanError,
    Settings,
    cache_part,
    guide_overrides,
    guide_part,
    plan_demo,
    split_stage2,
    stage2_overrides,
    stage2_part,
    stage2_seconds,
    stage_overhead,
    tail_parts,
)
from ldm.demo.probe import probe  # noqa: E402
from ldm.evaluation.report import machine, markdown_table  # noqa: E402
from ldm.utils.allocator import apply_policy  # noqa: E402
from ldm.utils.config import compose  # noqa: E402

IMPORT_S = time.time() - START
ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("demo")


def max_time(seconds: float) -> str:
    """Lightning's DD:HH:MM:SS."""
    s = max(1, int(seconds))
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def mmss(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def run(part: str, cmd: list[str]) -> None:
    log.info("[%s] $ %s", part, " ".join(cmd[1:]))
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"demo: the {part} step failed (exit {done.returncode}); its output is above. What the "
                         "earlier steps wrote is kept; rerunning the demo reuses the dataset shards and the cache.")


def plan_table(plan: DemoPlan, actual: dict[str, float] | None = None) -> str:
    rows = [{"part": p.name, "planned": mmss(p.seconds)} | ({"took": mmss(actual[p.name]) if p.name in actual else ""}
                                                           if actual is not None else {}) | {"what": p.detail}
            for p in plan.parts]
    total = {"part": "**total**", "planned": mmss(plan.total_s), "what": ""}
    if actual is not None:
        total["took"] = mmss(sum(actual.values()))
    return markdown_table([*rows, total], list(rows[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="deadline for the whole demo")
    parser.add_argument("--margin", type=float, default=60.0, help="seconds kept free for what estimates miss")
    parser.add_argument("--since", type=float, default=None, metavar="EPOCH_SECONDS",
                        help="when `make demo` started: its set-up (venv, packages, dataset) counts against the "
                             "deadline (default: this script's start)")
    parser.add_argument("--guide-share", type=float, default=Settings.guide_share,
                        help="share of stage 2's training time for autoguidance's guide model (0: no guide)")
    args = parser.parse_args()
    if not 0.0 <= args.guide_share < 1.0:
        parser.error(f"--guide-share {args.guide_share:g}: expected a share of stage 2's time in [0, 1) (0: no guide)")
    start = START if args.since is None else args.since
    if not START - 60 * args.minutes < start <= START + 1:
        parser.error(f"--since {args.since:.0f}: expected when `make demo` started, in seconds since the epoch: at "
                     f"most this script's start ({START:.0f}) and less than the {args.minutes:g}-minute deadline "
                     "before it")
    start = min(start, START)  # a second of clock rounding is not a negative set-up
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    py = sys.executable
    ae_cfg = compose(["experiment=ae_f8"])
    apply_policy(ae_cfg.host_allocator)  # as train.py does: the probe and the cache run as training will
    paths = ae_cfg.paths
    exports, grid_dir = Path(paths.export_dir), Path(paths.root_dir) / "samples" / "demo"
    classifier_dir = exports / "fashion_classifier"
    # The set-up before this script (make's venv and packages, on a fresh machine) is part of the deadline.
    actual: dict[str, float] = {"set-up (make)": START - start} if args.since is not None else {}
    log.info("demo on %s; deadline %g min", machine(), args.minutes)

    t = time.time()
    log.info("[dataset shards] Fashion-MNIST at %d px into %s", ae_cfg.data.resolution, paths.data_dir)
    instantiate(ae_cfg.data.prepare)()
    actual["dataset shards"] = time.time() - t

    t = time.time()
    log.info("[probe] measuring both stages, the encoder, sampling and the classifier on this machine ...")
    ldm_cfg = compose(["experiment=ldm_f8"])
    rates = probe(ae_cfg, ldm_cfg, startup_s=IMPORT_S + 2)
    actual["probe"] = time.time() - t
    settings = Settings(minutes=args.minutes, margin_s=args.margin, val_images=ae_cfg.data.val_limit,
                        need_classifier=not (classifier_dir / "config.yaml").is_file(),
                        ldm_batch_size=ldm_cfg.data.batch_size, guide_share=args.guide_share)
    try:
        plan = plan_demo(rates, settings, dict(actual))
    except PlanError as err:
        raise SystemExit(f"demo: {err}") from None
    log.info("measured (img/s): stage 1 %.1f, stage 2 %.0f, encoder %.0f, U-Net sampling forward %.0f, decoder %.0f, "
             "classifier %.0f; process start %.1f s", rates.ae_train, rates.ldm_train, rates.encode, rates.denoise,
             rates.decode, rates.classifier_train, rates.startup_s)
    if plan.note:
        log.info("%s", plan.note)
    settings = plan.settings  # without the guide's share where it was dropped
    log.info("plan (mm:ss):\n%s", plan_table(plan))

    def left() -> float:
        return 60 * args.minutes - (time.time() - start)

    def replan(*parts: Part) -> None:
        by_name = {p.name: p for p in parts}
        plan.parts = [by_name.get(p.name, p) for p in plan.parts]

    if settings.need_classifier:
        t = time.time()
        run("classifier", [py, "scripts/train_classifier.py", "--epochs", str(settings.classifier_epochs),
                           "--out", str(classifier_dir)])
        actual["classifier"] = time.time() - t

    t = time.time()
    run("stage 1", [py, "train.py", "experiment=ae_f8", f"trainer.max_time={max_time(plan.ae_seconds)}"])
    actual["stage 1 (ae_f8)"] = time.time() - t

    # What is left after stage 1 sizes the cache (an overrun or a saving so far moves into stage 2) ...
    ldm_s, cache_n = stage2_seconds(left(), rates, settings)
    if ldm_s < 60:
        raise SystemExit(f"demo: only {ldm_s:.0f} s are left for stage 2; exports/ae_f8 is kept — rerun with a "
                         "larger --minutes")
    replan(cache_part(cache_n, rates, settings))
    t = time.time()
    log.info("[latent cache] %d training + %d validation images (%s left)", cache_n, settings.val_images,
             mmss(left()))
    instantiate(compose(["experiment=ldm_f8", f"+data.prepare.limits.train={cache_n}"]).data.prepare)()
    actual["latent cache"] = time.time() - t

    # ... and stage 2 (with its guide) trains for what is left once the cache is built, less the grid and the table.
    train2, _ = stage2_seconds(left(), rates, settings, cache_train=cache_n)
    # Whether a guide is trained was decided once, by the plan on the probe's rates; an overrun here only shrinks both.
    ldm_s, guide_s = split_stage2(train2, settings)
    replan(stage2_part(ldm_s, rates), guide_part(guide_s, rates, settings))
    plan.ldm_seconds, plan.guide_seconds, plan.cache_train_images = ldm_s, guide_s, cache_n
    # Validation (loss + the image logger's samples) about every 4 minutes of training, not every short epoch.
    val_every = max(1, round(240 / (cache_n / rates.ldm_train)))
    ldm_overrides = ["experiment=ldm_f8", *stage2_overrides(ldm_s, cache_n, rates, settings)]
    log.info("[stage 2] %s left: trains %s with %s", mmss(left()), mmss(ldm_s), " ".join(ldm_overrides[1:]))
    t = time.time()
    run("stage 2", [py, "train.py", *ldm_overrides, f"trainer.max_time={max_time(ldm_s)}",
                    f"trainer.check_val_every_n_epoch={val_every}"])
    actual["stage 2 (ldm_f8)"] = time.time() - t

    if settings.guide_share > 0:
        # The guide gets what stage 2 left (an overrun or a saving there moves here), less the grid and the table.
        guide_s = left() - settings.margin_s - stage_overhead(rates) - sum(p.seconds for p in tail_parts(rates,
                                                                                                          settings))
        if guide_s < 30:
            raise SystemExit(f"demo: only {guide_s:.0f} s are left for the guide model; exports/ldm_f8 is kept (it "
                             "samples without one) — rerun with a larger --minutes, or --guide-share 0")
        replan(guide_part(guide_s, rates, settings))
        plan.guide_seconds = guide_s
        guide_val = max(1, round(240 / (cache_n * settings.guide_cost / rates.ldm_train)))
        t = time.time()
        run("guide", [py, "train.py", "experiment=ldm_f8_guide", *guide_overrides(guide_s, cache_n, rates, settings),
                      f"trainer.max_time={max_time(guide_s)}", f"trainer.check_val_every_n_epoch={guide_val}"])
        actual["guide (ldm_f8_guide)"] = time.time() - t

    t = time.time()
    run("sampling", [py, "sample.py", f"model_path={exports / 'ldm_f8'}", "num_images=8", f"out_dir={grid_dir}"])
    actual["sampling"] = time.time() - t

    t = time.time()
    table, fid = closing_evaluation(exports / "ldm_f8", classifier_dir, ae_cfg, settings)
    actual["accuracy table"] = time.time() - t

    total = time.time() - start
    since = "start" if args.since is None else "`make demo`"
    summary = (f"# Demo, {datetime.now():%Y-%m-%d %H:%M}\n\nMachine: {machine()}\n\nMeasured rates: "
               f"{json.dumps({k: round(v, 1) for k, v in asdict(rates).items()})}\n\n"
               f"{plan_table(plan, actual)}\n\nWall time from {since} to here: **{mmss(total)}** "
               f"(deadline {args.minutes:g} min).\n\nGrid: {grid_dir / 'grid.png'}\n\n{table}\n\n"
               f"Classifier-feature FID at the defaults: {fid:.1f}\n")
    report = Path(paths.log_dir) / "demo" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(summary)
    sys.stdout.write("\n" + summary + f"\nwritten: {report}\n")


def guidance_name(interval) -> str:
    return "guidance at every step" if interval is None else f"guidance where sigma is in ({interval[0]:g}, " \
                                                             f"{interval[1]:g}]"


def _list(node):
    return None if node is None else [float(v) for v in node]


def closing_evaluation(model: Path, classifier_dir: Path, ae_cfg, settings: Settings) -> tuple[str, float]:
    """Per-class accuracy and classifier-feature FID (markdown) of ``judge_per_class`` samples per class, at
    sample.py's default guidance (with the model's guide), without the guide, and at the cfg-only setting with the
    lowest FID; the defaults' FID."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    from ldm.checkpoints import load_classifier
    from ldm.data.loaders import ShardData
    from ldm.diffusion.guidance import default_guidance
    from ldm.evaluation.features import build_extractor
    from ldm.evaluation.samples import per_class_accuracy, read_reference, real_accuracy
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(model)
    classifier = load_classifier(classifier_dir)
    n = 10 * settings.judge_per_class
    fid = FrechetInceptionDistance(feature=build_extractor("classifier", classifier_dir), normalize=True,
                                   reset_real_features=False)

    def test_images(limit: int):
        return ShardData(train_shards=ae_cfg.data.val_shards, val_shards=ae_cfg.data.val_shards,
                         resolution=ae_cfg.data.resolution, val_batch_size=100, num_workers=0,
                         val_limit=limit).val_dataloader()

    read_reference(test_images(n), n, fid)
    real = real_accuracy(test_images(2000), classifier, 2000)
    defaults = compose([], config_name="sample")  # sample.py's default guidance, with the model's guide if it has one
    interval = _list(defaults.guidance_interval)
    cfg, w = default_guidance(pipe.guide is not None, defaults.cfg_scale, defaults.autoguidance)
    by = f"autoguidance {w:g} by {pipe.guide.source}, " if w != 1.0 else ""
    settings_by_row = {
        f"samples at the defaults: {by}cfg {cfg:g}, {guidance_name(interval)}":
            {"cfg_scale": cfg, "autoguidance": w, "guidance_interval": interval,
             "guidance_rescale": defaults.guidance_rescale}}
    if w != 1.0:
        cfg0, _ = default_guidance(False)
        settings_by_row[f"samples without the guide: cfg {cfg0:g}, {guidance_name(interval)} (the defaults without "
                        "one)"] = {"cfg_scale": cfg0, "guidance_interval": interval,
                                   "guidance_rescale": defaults.guidance_rescale}
    settings_by_row[f"samples, cfg {settings.baseline_cfg:g} at every step (the cfg-only sweep's lowest FID)"] = {
        "cfg_scale": settings.baseline_cfg, "guidance_interval": None}
    rows, fids = [], {}
    for name, guidance in settings_by_row.items():
        with torch.no_grad():
            acc = per_class_accuracy(pipe, classifier, settings.judge_per_class, steps=settings.sampling_steps,
                                     fid=fid, **guidance)
        fids[name] = float(fid.compute())
        fid.reset()  # the generated half; the test images' statistics are kept
        rows.append({"judged": name, "FID": f"{fids[name]:.1f}"} | {k: f"{100 * v:.1f}" for k, v in acc.items()})
    rows.append({"judged": "real test images", "FID": ""} | {k: f"{100 * v:.1f}" for k, v in real.items()})
    table = (f"Per-class accuracy (%) of {settings.judge_per_class} samples per class ({settings.sampling_steps} "
             f"steps) and of 2,000 real test images, judged by {classifier_dir}; FID of the {n} samples against as "
             "many test images in the classifier's features:\n\n" + markdown_table(rows, list(rows[0])))
    return table, next(iter(fids.values()))


if __name__ == "__main__":
    main()
