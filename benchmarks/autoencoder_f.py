"""Stage-1 ablation over f at an equal CPU budget: test-split PSNR/SSIM, images/s, parameters,
and the Fashion-MNIST classifier's label agreement between originals and reconstructions.

    python benchmarks/autoencoder_f.py --minutes 5            # f = 4, 8, 16, 5 min of training each
    python benchmarks/autoencoder_f.py --fs 8 --minutes 45 --result autoencoder_f8_45min

Each f is trained by the real CLI (`train.py experiment=ae_f<f> trainer.max_time=...`) into
`exports/bench_ae_f<f>`, then evaluated on the Fashion-MNIST test split (10,000 images).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_smoke_arg, markdown_table, smoke_dir, write_result  # noqa: E402

from ldm.checkpoints import load_classifier, load_first_stage  # noqa: E402
from ldm.data.loaders import ShardData  # noqa: E402
from ldm.evaluation.reconstruction import evaluate_reconstruction  # noqa: E402

log = logging.getLogger("autoencoder_f")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget per f (wall clock)")
    parser.add_argument("--fs", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--classifier", default="exports/fashion_classifier")
    parser.add_argument("--eval-limit", type=int, default=None, help="test images to evaluate (all: 10000)")
    parser.add_argument("--skip-training", action="store_true", help="evaluate existing exports only")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--result", default="autoencoder_f",
                        help="results file name (benchmarks/results/<name>.md), e.g. for a single-f long run")
    add_smoke_arg(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    smoke = smoke_dir(args)
    work = smoke or ROOT  # data, exports and logs
    paths = [f"paths.root_dir={work}", f"paths.data_dir={work}/data", f"paths.export_dir={work}/exports",
             f"paths.log_dir={work}/logs"]
    classifier_extra = []
    if smoke:  # one f, two batches of a narrow network, a classifier from 64 images, 32 test images
        args.fs, args.eval_limit, args.classifier = [8], 32, str(smoke / "classifier")
        classifier_extra = ["--limit", "64", "--test-limit", "64", "--epochs", "1"]
        args.extra = [*args.extra, "trainer.max_steps=4", "model.autoencoder.ch=8", "data.samples_per_epoch=32",
                      "+data.prepare.limit=128", "data.val_limit=16", "data.shuffle_buffer=16"]

    if not (ROOT / args.classifier / "model.safetensors").is_file():
        log.info("no classifier at %s: training it", args.classifier)
        sys.path.insert(0, str(ROOT / "scripts"))
        from train_classifier import main as train_classifier  # in this process: one interpreter start less

        train_classifier(["--out", str(ROOT / args.classifier), *classifier_extra])
    classifier = load_classifier(ROOT / args.classifier)
    budget = time.strftime("%H:%M:%S", time.gmtime(args.minutes * 60))
    rows = []
    for f in args.fs:
        task = f"bench_ae_f{f}"
        if not args.skip_training:
            cmd = [sys.executable, "train.py", f"experiment=ae_f{f}", f"task_name={task}",
                   f"trainer.max_time=00:{budget}", *paths, *args.extra]
            log.info("training f=%d for %s: %s", f, budget, " ".join(cmd))
            subprocess.run(cmd, check=True, cwd=ROOT)
        export = work / "exports" / task
        ae = load_first_stage(export)
        meta = OmegaConf.load(export / "config.yaml").metadata
        dm = ShardData(train_shards=str(work / "data/fashion_mnist_64/train"),
                       val_shards=str(work / "data/fashion_mnist_64/val"), resolution=64,
                           val_batch_size=100, num_workers=2, val_limit=args.eval_limit)
        start = time.perf_counter()
        metrics = evaluate_reconstruction(ae, dm.val_dataloader(), classifier)
        log.info("f=%d: %s (%.0f s)", f, metrics, time.perf_counter() - start)
        rows.append({
            "f": f, "latent": "x".join(str(d) for d in ae.latent_shape()),
            "params (M)": f"{sum(p.numel() for p in ae.parameters()) / 1e6:.2f}",
            "train images": meta.fit_images, "train img/s": f"{meta.fit_images / meta.fit_seconds:.1f}",
            "PSNR (dB)": f"{metrics['psnr']:.2f}", "SSIM": f"{metrics['ssim']:.4f}",
            "label agreement": f"{100 * metrics['agreement']:.2f}%",
            "acc orig / recon": f"{100 * metrics['acc_original']:.2f}% / {100 * metrics['acc_reconstruction']:.2f}%",
            "test images": int(metrics["images"]),
        })
    columns = list(rows[0])
    table = markdown_table(rows, columns)
    body = (f"Budget: {args.minutes:g} min of training per f (`trainer.max_time`, validation included), "
            f"default experiment configs{' + ' + ' '.join(args.extra) if args.extra else ''}. "
            "Metrics on the Fashion-MNIST test split at 64 px, posterior mode. img/s = training images per "
            "second of wall time in the Lightning loop.\n\n" + table)
    path = write_result(args.result, "Stage 1: autoencoder vs downsampling factor f", body)
    print(table)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
