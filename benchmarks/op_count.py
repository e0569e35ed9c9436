"""ATen operators dispatched per training step: ours vs diffusers' identical U-Net and autoencoder.

    python benchmarks/op_count.py          # the ldm_f8 U-Net and the ae_f8 autoencoder at the demo sizes

On a GPU every dispatched operator that launches a kernel costs the host a few microseconds; small
models are bound by that, not by arithmetic. Counting operators (a ``TorchDispatchMode``) is a
CPU-measurable proxy for that launch overhead. Counted per step after two warm-up steps: forward +
backward, and the whole step with the optimiser (ours: fused AdamW as our configs; diffusers: torch's
default AdamW on CUDA (foreach), as its training scripts). "kernels" leaves out views and allocations, which launch
nothing. torch.compile (on by default on CUDA) fuses far more; this counts the eager program.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_smoke_arg, markdown_table, native_bf16, smoke_dir, write_result  # noqa: E402
from train_step import twin_networks, unet_loss, vae_loss  # noqa: E402

from ldm.networks.device_paths import plain_paths  # noqa: E402
from ldm.utils.dispatch_count import OpCounter  # noqa: E402


def count_step(loss_fn, model, diffusers: bool, inputs, opt, autocast, plain: bool = False
               ) -> tuple[OpCounter, OpCounter]:
    """(forward + backward, optimiser step) operator counts of one training step; ``plain``: our networks on the
    path they take on a GPU (no CPU-only path, ldm.networks.device_paths)."""
    with OpCounter() as fwd_bwd, plain_paths() if plain else nullcontext():
        with autocast:
            loss = loss_fn(model, diffusers, *inputs)
        loss.backward()
    with OpCounter() as step:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return fwd_bwd, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_smoke_arg(parser)
    args = parser.parse_args()
    smoke = smoke_dir(args)
    unet_batch, ae_batch = (2, 2) if smoke else (32, 16)
    ours_unet, theirs_unet, ours_vae, theirs_vae = twin_networks((smoke or Path("/tmp")) / "ldm_bench_models")
    unet_in = (torch.randn(unet_batch, 4, 8, 8), torch.randint(0, 1000, (unet_batch,)),
               torch.randn(unet_batch, 77, 128))
    vae_in = (torch.rand(ae_batch, 3, 64, 64) * 2 - 1,)
    rows = []
    for precision in ["fp32"] + (["bf16-mixed"] if native_bf16() else []):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
        for (name, ours, theirs, loss_fn, inputs), plain in itertools.product(
                (("U-Net", ours_unet, theirs_unet, unet_loss, unet_in),
                 ("autoencoder", ours_vae, theirs_vae, vae_loss, vae_in)), (False, True)):
            counts = {}
            for who, model, is_diffusers, fused in (("ours", ours, False, True), ("diffusers", theirs, True, False)):
                # diffusers: torch's default AdamW on CUDA (foreach; the CPU default is a per-tensor loop).
                opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=fused or None, foreach=not fused or None)
                for _ in range(2):  # warm-up: the optimiser's state is created in its first step
                    count_step(loss_fn, model, is_diffusers, inputs, opt, autocast, plain)
                counts[who] = count_step(loss_fn, model, is_diffusers, inputs, opt, autocast, plain)
            (of, os_), (df, ds) = counts["ours"], counts["diffusers"]
            rows.append({"network": name, "precision": precision,
                         "our path": "GPU (plain)" if plain else "CPU",
                         "fwd+bwd ops ours / diffusers": f"{of.total} / {df.total}",
                         "fwd+bwd kernels ours / diffusers": f"{of.kernels} / {df.kernels}",
                         "optimiser kernels ours / diffusers": f"{os_.kernels} / {ds.kernels}",
                         "step kernels ours / diffusers": f"{of.kernels + os_.kernels} / {df.kernels + ds.kernels}",
                         "ours / diffusers (step kernels)":
                             f"{(of.kernels + os_.kernels) / (df.kernels + ds.kernels):.2f}"})
            print(rows[-1], flush=True)
    body = ("ATen operators dispatched in one training step (after two warm-up steps), U-Net batch "
            f"{unet_batch} on 8x8x4 latents with a 77x128 context, autoencoder batch {ae_batch} at 64 px "
            "(L1 + KL). kernels = operators less views and allocations (no launch). Our path 'CPU' is what this "
            "CPU runs (with the CPU-only paths of ldm/networks/device_paths.py); 'GPU (plain)' is the program a "
            "GPU runs, counted here. Ours: fused AdamW (our configs); diffusers: torch.optim.AdamW with "
            "foreach=True, its default on CUDA (its training scripts).\n\n" + markdown_table(rows, list(rows[0])))
    path = write_result("op_count", "Operators per training step: ours vs diffusers", body)
    print(body, f"\nwritten to {path}", sep="\n")


if __name__ == "__main__":
    main()
