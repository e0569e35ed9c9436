"""Convert a folder of images (optional same-stem .txt captions) into webdataset shards.

    python scripts/folder_to_shards.py path/to/images data/mine --resolution 256
"""

import argparse
import logging

from ldm.data.shards import folder_to_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("out_dir")
    parser.add_argument("--prefix", default="data")
    parser.add_argument("--resolution", type=int, default=None, help="resize + centre-crop to this side")
    parser.add_argument("--samples-per-shard", type=int, default=5000)
    parser.add_argument("--default-caption", default="", help="caption for images without a .txt file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder_to_shards(args.folder, args.out_dir, args.prefix, args.resolution, args.samples_per_shard,
                     args.default_caption)


if __name__ == "__main__":
    main()
