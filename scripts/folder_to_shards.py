"""Convert a folder of images into webdataset shards (labels, captions; in parallel; resumable).

    python scripts/folder_to_shards.py path/to/images data/mine --resolution 256
    python scripts/folder_to_shards.py imagenet/train data/imagenet/train --labels folders --workers 16
    python scripts/folder_to_shards.py laion_subset data/laion --captions laion_subset/meta.parquet

--labels folders: one folder per class (ImageNet's layout); the class names are written beside the shards
(classes.json). Captions come from --captions (a CSV/JSONL/JSON/Parquet table with a key/file/filename/path and a
caption/text column), else a same-stem .txt file, else a same-stem .json file's "caption". Run the same command
again after an interruption: finished shards are kept, the missing ones written (ldm/data/folder.py).
"""

import argparse
import logging
import os

from ldm.data.folder import folder_to_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("out_dir")
    parser.add_argument("--prefix", default="data")
    parser.add_argument("--resolution", type=int, default=None,
                        help="resize (short side) + centre-crop to this side; default: keep each image's size")
    parser.add_argument("--samples-per-shard", type=int, default=5000)
    parser.add_argument("--labels", choices=["folders"], default=None, help="class labels from class subfolders")
    parser.add_argument("--captions", default=None, help="a metadata table of captions (.csv/.jsonl/.json/.parquet)")
    parser.add_argument("--default-caption", default="", help="caption for images without one")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="conversion processes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = folder_to_shards(args.folder, args.out_dir, args.prefix, args.resolution, args.samples_per_shard,
                                  args.default_caption, args.labels, args.captions, args.workers)
    except (ValueError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    print(result.summary())


if __name__ == "__main__":
    main()
