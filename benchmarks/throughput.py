"""Input pipeline and end-to-end stage-2 throughput.

    python benchmarks/throughput.py                       # at the configs' precision for this machine
    python benchmarks/throughput.py --precision 32-true   # -> benchmarks/results/throughput_<precision>.md

1. Data loading: images/s decoded + resized + scaled (webdataset PNG shards, batch 16, 64 px) with 0, 1
   and 2 workers, and latent-cache records/s (batch 64), against what the training steps consume
   (ae_f8 step at batch 16, ldm_f8 U-Net step at batch 64, measured here in the same process).
2. Stage 2 end to end through the Lightning loop (data, EMA, logging included): ldm_f8 with online
   encoding of images by the frozen first stage vs reading the latent cache, the same number of steps,
   with the configured data workers (data.num_workers: on a CPU, the cores the compute leaves free).
3. Building the latent cache (``ldm.latent_cache``: loader workers, encoder on the accelerator, a writer
   thread) in images/s, next to the encoder's pure forward rate at the same batch (target >= 0.7 of it).
Needs exports/ae_f8 and the built-in dataset (python train.py experiment=ae_f8); ``--smoke`` makes a tiny
random first stage and dataset in a temporary folder instead.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.utils.config import compose

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ROOT,
    add_smoke_arg,
    make_smoke_first_stage,
    markdown_table,
    median_seconds,
    smoke_dir,
    write_result,
)


def loader_rate(data, batches: int) -> float:
    loader = data.train_dataloader()
    it = iter(loader)
    first = next(it)  # worker start-up and shuffle-buffer fill are not throughput
    n = len(first.get("image", first.get("latent")))
    start = time.perf_counter()
    for _ in itertools.islice(it, batches):
        pass
    return batches * n / (time.perf_counter() - start)


def cache_build_rates(first_stage: str, image_shards: Path, out: Path, images: int) -> list[dict]:
    """Latent-cache build rate of ``images`` training images vs the encoder's forward rate at the same batch."""
    import shutil

    from ldm.checkpoints import load_first_stage
    from ldm.latent_cache import PosteriorEncoder, prepare_latent_cache, resolve_device

    cfg = compose(["experiment=ldm_f8", f"model.first_stage={first_stage}"])
    batch, workers = cfg.data.prepare.batch_size, cfg.data.num_workers
    device = resolve_device("auto")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    prepare_latent_cache(first_stage, {"train": str(image_shards)}, out, batch_size=batch, num_workers=workers,
                         limits={"train": images})
    if device.type == "cuda":
        torch.cuda.synchronize()
    build = images / (time.perf_counter() - start)
    encode = PosteriorEncoder(load_first_stage(first_stage, device=device), device)
    x = torch.rand(batch, 3, 64, 64, device=device) * 2 - 1
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    forward = batch / median_seconds(lambda: (encode(x), sync()), 1, 3)
    shutil.rmtree(out, ignore_errors=True)
    row = {"device": str(device), "images": images, "encoding batch": batch, "loader workers": workers,
           "build images/s (incl. start-up)": f"{build:.0f}", "encoder forward images/s": f"{forward:.0f}",
           "build / forward": f"{build / forward:.2f}"}
    print(row, flush=True)
    return [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--steps", type=int, default=60, help="stage-2 steps per end-to-end run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating online/cached run pairs")
    parser.add_argument("--cache-limit", type=int, default=20000, help="training records in the latent cache")
    parser.add_argument("--first-stage", default="exports/ae_f8", help="the frozen first stage of stage 2")
    parser.add_argument("--precision", default=None, choices=["32-true", "bf16-mixed"],
                        help="trainer.precision of every run and step (default: the configs' choice for this machine)")
    parser.add_argument("--cache-images", type=int, default=10000, help="training images encoded for the cache rate")
    add_smoke_arg(parser)
    args = parser.parse_args()
    smoke = smoke_dir(args)
    work = smoke or ROOT  # where data, exports and logs go
    if smoke:
        args.batches, args.steps, args.rounds, args.cache_limit, args.cache_images = 4, 2, 1, 64, 64
        args.first_stage = str(make_smoke_first_stage(smoke / "exports" / "ae_f8"))
    paths = [f"paths.root_dir={work}", f"paths.data_dir={work}/data", f"paths.export_dir={work}/exports",
             f"paths.log_dir={work}/logs"]
    tiny = ["+data.prepare.limit=256", "+data.prepare.image_prepare.limit=256"] if smoke else []
    from ldm.data.loaders import ShardData
    from ldm.training import build, train
    from ldm.utils.allocator import apply_policy

    # The host allocator policy train.py applies, for every measurement here (not only the Lightning runs).
    allocator = compose([]).host_allocator
    apply_policy(allocator)

    images = work / "data/fashion_mnist_64"
    first_stage = str((ROOT / args.first_stage).resolve())
    latents = work / "data/latents" / Path(first_stage).name
    # Build the image shards and the latent cache first, as training does on first use (no-ops when they exist).
    from hydra.utils import instantiate

    instantiate(compose(["experiment=ae_f8", *paths, *tiny[:1]]).data).prepare_data()
    instantiate(compose(["experiment=ldm_f8", *paths, f"model.first_stage={first_stage}", *tiny[1:],
                         f"+data.prepare.limits.train={args.cache_limit}"]).data).prepare_data()
    precision = args.precision or compose(["experiment=ldm_f8", "trainer.accelerator=cpu"]).trainer.precision
    # The consumers below run at the precision the trainer would use.
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=str(precision).startswith("bf16"))
    rows = []
    for workers in (0, 1, 2):
        data = ShardData(train_shards=str(images / "train"), resolution=64, batch_size=16, num_workers=workers)
        rate = loader_rate(data, args.batches)
        rows.append({"input": "PNG shards -> [-1, 1] 64 px", "workers": workers, "samples/s": f"{rate:.0f}",
                     "per worker": f"{rate / workers:.0f}" if workers else "-"})
        print(rows[-1], flush=True)
    for workers in (0, 2):
        data = ShardData(train_shards=str(latents / "train"), kind="latent", batch_size=64, num_workers=workers,
                         required_keys=("caption", "class_label"))
        rate = loader_rate(data, max(1, args.batches // 4))
        rows.append({"input": "latent cache records", "workers": workers, "samples/s": f"{rate:.0f}",
                     "per worker": f"{rate / workers:.0f}" if workers else "-"})
        print(rows[-1], flush=True)

    cache_rows = cache_build_rates(first_stage, images / "train", work / "data/bench_cache", args.cache_images)
    ae_cfg = compose(["experiment=ae_f8", "trainer.accelerator=cpu"])
    stage = build(ae_cfg.model)
    opt_ae, _ = stage.configure_optimizers()
    x = torch.rand(16, 3, 64, 64) * 2 - 1

    def ae_step():
        with autocast:
            xrec, post = stage.autoencoder(x)
            loss, _ = stage.loss.generator_loss(x, xrec, post, 0)
        loss.backward()
        opt_ae.step()
        opt_ae.zero_grad(set_to_none=True)

    consume = {"ae_f8 training step (batch 16)": 16 / median_seconds(ae_step, 1, 5)}
    ldm_cfg = compose(["experiment=ldm_f8", "trainer.accelerator=cpu", f"model.first_stage={first_stage}"])
    ldm = build(ldm_cfg.model)
    opt = ldm.configure_optimizers()
    batch = {"latent": torch.randn(64, 8, 8, 8).abs(), "caption": ["a photo of a bag"] * 64,
             "class_label": torch.zeros(64, dtype=torch.long)}

    def ldm_step():
        with autocast:
            loss = ldm.loss(batch)[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    consume["ldm_f8 U-Net step (batch 64)"] = 64 / median_seconds(ldm_step, 1, 5)
    consumption = [{"training step": k, "consumes samples/s": f"{v:.0f}"} for k, v in consume.items()]
    print(consumption, flush=True)

    # Online and cached runs alternate round by round, and each round's pair gives a ratio: this machine's
    # speed drifts by 10-40% over minutes, which would land on one side of a single pair of runs.
    e2e, pairs = [], []
    for round_ in range(args.rounds):
        pair = []
        for name, extra in (("online encoding (data=fashion_mnist)", ["data=fashion_mnist", "data.batch_size=64"]),
                            ("latent cache", [f"+data.prepare.limits.train={args.cache_limit}"])):
            task = "bench_ldm_" + ("online" if "online" in name else "cache")
            cfg = compose(["experiment=ldm_f8", f"task_name={task}", f"trainer.max_steps={args.steps}",
                           f"model.first_stage={first_stage}", *paths,
                           "trainer.max_time=null", f"trainer.precision={precision}",
                           f"paths.output_dir={work}/logs/{task}", *extra,
                           *(tiny[:1] if "online" in name else tiny[1:])])
            train(cfg)
            meta = OmegaConf.load(work / "exports" / task / "config.yaml").metadata
            pair.append(meta.fit_images / meta.fit_seconds)
            e2e.append({"round": round_ + 1, "stage 2 input": name, "data workers": cfg.data.num_workers,
                        "steps": args.steps, "images": meta.fit_images, "seconds": meta.fit_seconds,
                        "images/s": f"{pair[-1]:.1f}"})
            print(e2e[-1], flush=True)
        pairs.append(pair)
    ratios = [cache / online for online, cache in pairs]
    online_rate = statistics.median(online for online, _ in pairs)
    speedup = statistics.median(ratios)
    rate = {(r["input"].split()[0], r["workers"]): float(r["samples/s"]) for r in rows}
    (ae_name, ae_rate), (ldm_name, ldm_rate) = consume.items()
    margins = [{"loader (2 workers)": "PNG shards", "consumer": ae_name, "margin": f"{rate['PNG', 2] / ae_rate:.1f}x"},
               {"loader (2 workers)": "PNG shards", "consumer": f"stage 2 with online encoding ({online_rate:.1f} "
                "images/s end to end)", "margin": f"{rate['PNG', 2] / online_rate:.1f}x"},
               {"loader (2 workers)": "latent cache", "consumer": ldm_name,
                "margin": f"{rate['latent', 2] / ldm_rate:.1f}x"}]
    body = (f"Training steps and stage-2 runs at precision {precision}; host allocator policy `{allocator}` "
            "(configs/train.yaml host_allocator) for everything measured.\n\n"
            "Data loading (first batch excluded: worker start-up and shuffle buffer):\n\n"
            + markdown_table(rows, list(rows[0])) + "\n\nBuilding the latent cache (encoder in bf16 where native, "
            "loader workers = data.num_workers, a writer thread) vs the encoder alone on random images of the same "
            "batch (target: build >= 0.7 of the forward rate):\n\n" + markdown_table(cache_rows, list(cache_rows[0]))
            + "\n\nWhat the training steps consume (forward + backward + "
            "optimiser, no data loading):\n\n" + markdown_table(consumption, list(consumption[0]))
            + f"\n\nStage 2 end to end (Lightning loop, ldm_f8, batch 64, {args.steps} steps per run, the two inputs "
            f"alternating, fit wall time incl. "
            f"data, EMA, logging):\n\n" + markdown_table(e2e, list(e2e[0]))
            + f"\n\nLatent cache vs online encoding: {speedup:.2f}x (median over rounds; per round "
            + ", ".join(f"{r:.2f}x" for r in ratios) + ").\n\nData loading with 2 workers vs what its "
            "consumer takes (target >= 3x):\n\n" + markdown_table(margins, list(margins[0])))
    path = write_result(f"throughput_{precision}", "Input pipeline and stage-2 throughput", body)
    print(body, f"\nwritten to {path}", sep="\n")


if __name__ == "__main__":
    main()
