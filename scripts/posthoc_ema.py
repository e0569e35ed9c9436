"""Post-hoc EMA (Karras et al. 2024): an EMA of any width, reconstructed from a run's snapshots and exported.

    python scripts/posthoc_ema.py --run logs/ldm_f8/runs/<run> --list                    # the snapshots
    python scripts/posthoc_ema.py --run logs/ldm_f8/runs/<run> --sigma-rel 0.08 --out exports/ldm_f8_ema0.08
    python sample.py model_path=exports/ldm_f8_ema0.08

The run must have trained with callbacks.posthoc_ema (on in the stage-2 callbacks: two power-function EMA profiles,
sigma_rel 0.05 and 0.10, a snapshot every callbacks.posthoc_ema.every_n_steps). --sigma-rel is the EMA's width
relative to the training length (the paper's sigma_rel: 0.05-0.15 usual); --step reconstructs it as it was at an
earlier step. The export is the run's export (--model, default exports/<task>) with the U-Net and conditioner's
trained weights replaced; its config records the width, the step and how well the snapshots matched the profile.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ldm.posthoc_ema import list_snapshots, reconstruct, snapshot_folder


def export_reconstruction(model: Path, out: Path, weights: dict, info: dict) -> Path:
    import torch

    from ldm.checkpoints import UNetAndConditioner
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(model)
    bundle = UNetAndConditioner(pipe.unet, pipe.conditioner)
    state = bundle.state_dict()
    unknown = sorted(set(weights) - set(state))
    if unknown:
        raise ValueError(f"the snapshots hold {len(unknown)} tensors {model} does not have (first: {unknown[0]}): "
                         "pass the export of the run that wrote them as --model")
    for name, value in weights.items():
        if state[name].shape != value.shape:
            raise ValueError(f"{name}: {tuple(value.shape)} in the snapshots, {tuple(state[name].shape)} in {model}")
    with torch.no_grad():
        for name, value in weights.items():
            state[name].copy_(value.to(state[name].dtype))
    return pipe.save_pretrained(out, metadata={"posthoc_ema": json.dumps(info)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the run folder (or its posthoc_ema/ folder of snapshots)")
    parser.add_argument("--sigma-rel", type=float, help="the EMA width to reconstruct, e.g. 0.08")
    parser.add_argument("--step", type=int, default=None, help="as it was at this step (default: the last snapshot)")
    parser.add_argument("--model", default=None, help="the run's export (default: exports/<the run's task>)")
    parser.add_argument("--out", default=None, help="the new export folder (default: <model>_ema<sigma-rel>)")
    parser.add_argument("--list", action="store_true", help="list the snapshots and stop")
    args = parser.parse_args()
    try:
        folder = snapshot_folder(Path(args.run))
        snapshots = list_snapshots(folder)
        if args.list:
            for s in snapshots:
                print(f"step {s.step}: sigma_rel {s.sigma_rels} ({s.path.name})")
            return
        if args.sigma_rel is None:
            raise ValueError("--sigma-rel is needed (or --list)")
        model = Path(args.model) if args.model else Path("exports") / Path(args.run).resolve().parents[1].name
        weights, info = reconstruct(folder, args.sigma_rel, args.step)
        out = Path(args.out) if args.out else model.with_name(f"{model.name}_ema{args.sigma_rel:g}")
        export_reconstruction(model, out, weights, info)
    except (ValueError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"sigma_rel {args.sigma_rel:g} at step {info['step']} from {info['snapshots']} snapshots (profile matched "
          f"to {100 * info['profile_error']:.2f}% relative L2 error) -> {out}")


if __name__ == "__main__":
    main()
