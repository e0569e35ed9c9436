"""Export a trained model as a diffusers pipeline folder (see ldm/interop/diffusers_pipeline.py).

    python scripts/export_diffusers.py exports/ldm_f8 out/ldm_f8_diffusers
"""

from __future__ import annotations

import argparse

from ldm.interop.diffusers_pipeline import export_diffusers_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an export folder (exports/ldm_f8) or a stage-2 .ckpt")
    parser.add_argument("out", help="the diffusers pipeline folder to write (must not exist)")
    args = parser.parse_args()
    print(f"diffusers pipeline: {export_diffusers_pipeline(args.model, args.out)}")


if __name__ == "__main__":
    main()
