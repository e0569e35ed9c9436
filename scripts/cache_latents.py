"""Encode image shards once with an exported first stage into latent shards (the latent cache).

    python scripts/cache_latents.py exports/ae_f8 data/latents/ae_f8 \
        --split train=data/fashion_mnist_64/train --split val=data/fashion_mnist_64/val

Then train stage 2 on them: `python train.py experiment=ldm_f8 data=fashion_mnist_latents`
(the ldm experiments already do this, and build the cache on first use).
"""

import argparse
import logging

from ldm.latent_cache import prepare_latent_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first_stage")
    parser.add_argument("out_dir")
    parser.add_argument("--split", action="append", required=True, help="name=shards (directory, list or braces)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--samples-per-shard", type=int, default=5000)
    parser.add_argument("--device", default="auto", help="auto: the GPU when there is one")
    parser.add_argument("--num-workers", type=int, default=2, help="image-decoding loader processes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    splits = dict(s.split("=", 1) for s in args.split)
    prepare_latent_cache(args.first_stage, splits, args.out_dir, batch_size=args.batch_size,
                         samples_per_shard=args.samples_per_shard, device=args.device,
                         num_workers=args.num_workers)


if __name__ == "__main__":
    main()
