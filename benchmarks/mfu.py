"""Model-FLOPs utilisation of a Stable-Diffusion-size U-Net training step (meant for a GPU, bf16-mixed).

    python benchmarks/mfu.py                          # SD 1.x U-Net, 256 px (32x32x4 latents), batch 16
    python benchmarks/mfu.py --compile                # also time torch.compile'd networks
    python benchmarks/mfu.py --unet ldm_f8 --resolution 64 --batch 32 --precision fp32 --iters 3   # CPU check

The U-Net is SD 1.x's (model_channels 320, channel_mult [1, 2, 4, 4], 2 res blocks, attention at
levels 1-3, 8 heads, 768-wide 77-token context: 860M parameters); diffusers' UNet2DConditionModel is
built from the same config with the same weights. A step is forward + backward + AdamW (ours: fused,
as our configs; diffusers: torch defaults, as its training scripts). FLOPs are counted once with
torch.utils.flop_counter on diffusers' network (the architecture's nominal count), and
MFU = nominal FLOPs per step / step time / peak. Peak: --peak-tflops, else the device's dense bf16
peak when it is a known GPU (A100 312, H100 SXM 989, H200 989 TFLOP/s), else the matmul ceiling
measured here. MosaicML's SD replication reports about 28% on A100s.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_smoke_arg, interleaved_medians, markdown_table, smoke_dir, write_result  # noqa: E402
from train_step import UNET, matmul_ceiling, train_step, unet_loss  # noqa: E402

from ldm.interop.diffusers import save_diffusers_folder  # noqa: E402
from ldm.networks.unet import UNet  # noqa: E402

SD_UNET = dict(in_channels=4, model_channels=320, num_res_blocks=2, channel_mult=[1, 2, 4, 4],
               attention_resolutions=[4, 2, 1], num_heads=8, num_head_channels=-1, context_dim=768)
CONFIGS = {"sd": SD_UNET, "ldm_f8": UNET}
KNOWN_PEAKS_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}


def device_peak(device: str, dtype: torch.dtype) -> tuple[float, str]:
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, tflops in KNOWN_PEAKS_TFLOPS.items():
            if key in name and dtype == torch.bfloat16:
                return tflops * 1e12, f"{name}: dense bf16 peak {tflops:.0f} TFLOP/s (datasheet)"
    measured = matmul_ceiling(dtype, device)
    return measured, f"measured matmul ceiling {measured / 1e12:.3f} TFLOP/s (no datasheet peak known here)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", default="sd", choices=sorted(CONFIGS), help="sd, or the small ldm_f8 U-Net")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "fp32"])
    parser.add_argument("--resolution", type=int, default=256, help="image size; latents are resolution / 8")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd networks")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for the MFU")
    add_smoke_arg(parser)
    args = parser.parse_args()
    smoke = smoke_dir(args)
    if smoke:  # the small U-Net on the CPU: proves the script runs
        args.unet, args.device, args.precision, args.resolution, args.batch, args.iters = \
            "ldm_f8", "cpu", "fp32", 64, 2, 1
    from diffusers import UNet2DConditionModel

    device, n = args.device, args.batch
    dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    autocast = torch.autocast(device, dtype=torch.bfloat16) if args.precision == "bf16-mixed" else nullcontext()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    ours = UNet(**CONFIGS[args.unet])
    theirs = UNet2DConditionModel.from_pretrained(
        save_diffusers_folder(ours, (smoke or Path("/tmp")) / f"ldm_bench_models/mfu_{args.unet}"))
    params = sum(p.numel() for p in ours.parameters())
    assert params == sum(p.numel() for p in theirs.parameters())
    side = args.resolution // 8
    x = torch.randn(n, 4, side, side, device=device)
    t = torch.randint(0, 1000, (n,), device=device)
    ctx = torch.randn(n, 77, ours.context_dim, device=device)
    with FlopCounterMode(display=False) as counter:  # one image, forward + backward (FLOPs scale with the batch)
        theirs(x.cpu()[:1], t.cpu()[:1], encoder_hidden_states=ctx.cpu()[:1]).sample.sum().backward()
    theirs.zero_grad(set_to_none=True)
    flops_per_step = counter.get_total_flops() * n
    candidates = {"ours": (ours, False, True), "diffusers": (theirs, True, False)}
    if args.compile:
        candidates |= {"ours (compiled)": (torch.compile(ours), False, True),
                       "diffusers (compiled)": (torch.compile(theirs), True, False)}
    fns = {}
    for who, (model, is_diffusers, fused) in candidates.items():
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused or None)

        def run(m=model, o=opt, d=is_diffusers):
            train_step(unet_loss, m, d, (x, t, ctx), o, autocast)
            sync()

        fns[who] = run
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = interleaved_medians(fns, 2, args.iters)
    peak, peak_note = (args.peak_tflops * 1e12, f"given peak {args.peak_tflops:.0f} TFLOP/s") if args.peak_tflops \
        else device_peak(device, dtype)
    rows = [{"network": who, "precision": args.precision, "batch": n, "step (ms)": f"{1000 * sec:.1f}",
             "images/s": f"{n / sec:.1f}", "TFLOP/s": f"{flops_per_step / sec / 1e12:.3f}",
             "MFU": f"{100 * flops_per_step / sec / peak:.1f}%"} for who, sec in times.items()]
    memory = (f"max allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB (both networks resident)"
              if device == "cuda" else "CPU")
    name = "SD 1.x U-Net" if args.unet == "sd" else "ldm_f8 U-Net"
    body = (f"{name} ({params / 1e6:.0f}M parameters) at {args.resolution} px ({side}x{side}x4 latents, "
            f"77x{ours.context_dim} context), {flops_per_step / n / 1e9:.1f} GFLOP per image per step "
            f"(forward + backward, counted on diffusers' network). Median of {args.iters} rounds, candidates in "
            "alternation. "
            f"Peak: {peak_note}. Memory: {memory}.\n\n" + markdown_table(rows, list(rows[0])))
    path = write_result(f"mfu_{args.unet}_{device}_b{n}", f"Model-FLOPs utilisation: {name} training step", body)
    print(body, f"\nwritten to {path}", sep="\n")


if __name__ == "__main__":
    main()
