"""Training-step speed: our U-Net and autoencoder vs diffusers' with the identical architecture.

    python benchmarks/train_step.py                  # fp32 (+ bf16-mixed where bf16 is native)

U-Net: the ldm_f8 U-Net (model_channels 64, channel_mult [1, 2], attention at both levels, 32-wide
heads, linear projections), batch 32 on 8x8x4 latents with a 77-token context of width 128. The
diffusers twin is built from the same config by ldm.interop.diffusers (equal parameter counts are
asserted) and given the same weights. Autoencoder: the ae_f8 network (ch 32, ch_mult [1, 2, 4, 4]),
batch 16 at 64 px, L1 + KL. A step = forward + backward + AdamW. Also reported: achieved FLOP/s of
our U-Net step (counted with torch.utils.flop_counter) against this machine's matmul ceiling, and
peak RSS (CPU) or max allocated memory (GPU).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_smoke_arg,
    interleaved_medians,
    markdown_table,
    median_seconds,
    native_bf16,
    peak_rss_mb,
    smoke_dir,
    write_result,
)

from ldm.interop.diffusers import save_diffusers_folder  # noqa: E402
from ldm.networks.autoencoder import AutoencoderKL  # noqa: E402
from ldm.networks.unet import UNet  # noqa: E402

UNET = dict(in_channels=4, model_channels=64, num_res_blocks=1, channel_mult=[1, 2], attention_resolutions=[1, 2],
            num_head_channels=32, context_dim=128, use_linear_in_transformer=True)
AE = dict(ch=32, ch_mult=[1, 2, 4, 4], num_res_blocks=1, resolution=64, z_channels=4, embed_dim=4)


def matmul_ceiling(dtype: torch.dtype, device: str) -> float:
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)
    sec = median_seconds(lambda: (a @ b, torch.cuda.synchronize() if device == "cuda" else None), 1, 5)
    return 2 * 2048**3 / sec


def conv_ceiling(dtype: torch.dtype, device: str) -> float:
    """FLOP/s of a 3x3 convolution's forward + backward (128 -> 128 channels, 32x32, batch 32)."""
    x = torch.randn(32, 128, 32, 32, device=device, dtype=dtype, requires_grad=True)
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).to(device, dtype)

    def run():
        conv(x).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    flops = 3 * 2 * 32 * 32 * 32 * 128 * 128 * 9  # forward, grad input, grad weight
    return flops / median_seconds(run, 1, 5)


def unet_loss(model, diffusers: bool, x, t, ctx):
    out = model(x, t, encoder_hidden_states=ctx).sample if diffusers else model(x, t, context=ctx)
    return (out.float() - x).pow(2).mean()


def vae_loss(model, diffusers: bool, x):
    if diffusers:
        post = model.encode(x).latent_dist
        rec = model.decode(post.sample()).sample
    else:
        post = model.encode(x)
        rec = model.decode(post.sample())
    return (rec.float() - x).abs().mean() + 1e-6 * post.kl().float().mean()


def twin_networks(folder: Path) -> tuple:
    """(our U-Net, diffusers' twin, our autoencoder, diffusers' twin): the demo networks with the same weights
    (seed 0), the diffusers models converted through ``folder``; parameter counts asserted equal."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ours_unet = UNet(**UNET)
    theirs_unet = UNet2DConditionModel.from_pretrained(save_diffusers_folder(ours_unet, folder / "unet"))
    ours_vae = AutoencoderKL(**AE)
    theirs_vae = DiffusersVAE.from_pretrained(save_diffusers_folder(ours_vae, folder / "vae"))
    for a, b in ((ours_unet, theirs_unet), (ours_vae, theirs_vae)):
        assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    return ours_unet, theirs_unet, ours_vae, theirs_vae


def train_step(loss_fn, model, diffusers: bool, inputs, opt, autocast):
    """Forward (``loss_fn``, possibly compiled) + backward + optimiser step."""
    with autocast:
        loss = loss_fn(model, diffusers, *inputs)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=9, help="timed rounds (each times every candidate once)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile'd copies of both implementations (model.compile=true); "
                             "compilation takes minutes on a CPU")
    add_smoke_arg(parser)
    args = parser.parse_args()
    smoke = smoke_dir(args)
    if smoke:
        args.iters = 1
    if args.compile:  # compile times as a user's first run sees them, not from an earlier run's cache
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = False
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    precisions = ["fp32"] + (["bf16-mixed"] if native_bf16() else [])
    unet_batch, ae_batch = (2, 2) if smoke else (32, 16)
    ours_unet, theirs_unet, ours_vae, theirs_vae = twin_networks((smoke or Path("/tmp")) / "ldm_bench_models")
    x = torch.randn(unet_batch, 4, 8, 8, device=device)
    t = torch.randint(0, 1000, (unet_batch,), device=device)
    ctx = torch.randn(unet_batch, 77, 128, device=device)
    img = torch.rand(ae_batch, 3, 64, 64, device=device) * 2 - 1

    rows = []
    for precision in precisions:
        autocast = (torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext())
        for name, ours, theirs, loss_fn, inputs, per in (
            ("U-Net", ours_unet, theirs_unet, unet_loss, (x, t, ctx), unet_batch),
            ("autoencoder", ours_vae, theirs_vae, vae_loss, (img,), ae_batch),
        ):
            # Ours as the framework trains it (fused AdamW, configs/model/*.yaml); diffusers as its training
            # scripts do (torch.optim.AdamW defaults), and with the same fused AdamW to isolate the network.
            candidates = {"ours": (ours, False, True), "diffusers": (theirs, True, False),
                          "diffusers+fused": (theirs, True, True)}
            if args.compile:  # compiled copies (own weights and optimiser state), both with fused AdamW
                candidates |= {"ours+compile": (copy.deepcopy(ours), False, True),
                               "diffusers+compile": (copy.deepcopy(theirs), True, True)}
            fns, compile_seconds = {}, {}
            for who, (model, is_diffusers, fused) in candidates.items():
                model.to(device).train()
                opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused or None)
                # Compiling the forward + loss (not the module) covers the autoencoder's encode/decode too.
                fn = torch.compile(loss_fn) if who.endswith("+compile") else loss_fn

                def run(m=model, o=opt, d=is_diffusers, f=fn, i=inputs, ac=autocast):
                    train_step(f, m, d, i, o, ac)
                    sync()

                if who.endswith("+compile"):  # the first two steps compile forward and backward
                    start = time.perf_counter()
                    run()
                    run()
                    compile_seconds[who] = time.perf_counter() - start
                    print(f"{name} {who}: compiled in {compile_seconds[who]:.0f} s", flush=True)
                fns[who] = run
            times = interleaved_medians(fns, 2, args.iters)
            flops = {}
            for who, model in (("ours", ours), ("diffusers", theirs)):
                with FlopCounterMode(display=False) as counter:
                    train_step(loss_fn, model, who == "diffusers", inputs, torch.optim.AdamW(model.parameters(), lr=0),
                               autocast)
                flops[who] = counter.get_total_flops()
            rows.append({"model": name, "precision": precision, "batch": per,
                         "params (M)": f"{sum(p.numel() for p in ours.parameters()) / 1e6:.2f}",
                         "ours (ms)": f"{1000 * times['ours']:.0f}",
                         "diffusers (ms)": f"{1000 * times['diffusers']:.0f}",
                         "speed-up": f"{times['diffusers'] / times['ours']:.2f}x",
                         "diffusers + fused AdamW (ms)": f"{1000 * times['diffusers+fused']:.0f}",
                         "speed-up, same optimiser": f"{times['diffusers+fused'] / times['ours']:.2f}x",
                         "ours img/s": f"{per / times['ours']:.1f}",
                         "GFLOP/step ours / nominal": f"{flops['ours'] / 1e9:.1f} / {flops['diffusers'] / 1e9:.1f}",
                         "nominal GFLOP/s": f"{flops['diffusers'] / times['ours'] / 1e9:.0f}"})
            if args.compile:
                rows[-1] |= {"ours compiled (ms)": f"{1000 * times['ours+compile']:.0f}",
                             "diffusers compiled (ms)": f"{1000 * times['diffusers+compile']:.0f}",
                             "speed-up compiled vs diffusers": f"{times['diffusers'] / times['ours+compile']:.2f}x",
                             "speed-up, both compiled": f"{times['diffusers+compile'] / times['ours+compile']:.2f}x",
                             "compile s ours / diffusers": f"{compile_seconds['ours+compile']:.0f} / "
                                                           f"{compile_seconds['diffusers+compile']:.0f}"}
            print(rows[-1], flush=True)
    dtypes = {p: torch.bfloat16 if p == "bf16-mixed" else torch.float32 for p in precisions}
    ceilings = {p: (matmul_ceiling(d, device) / 1e9, conv_ceiling(d, device) / 1e9) for p, d in dtypes.items()}
    memory = (f"max allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device == "cuda"
              else f"peak RSS {peak_rss_mb():.0f} MiB (whole process, both implementations)")
    body = (f"Median of {args.iters} steps after 2 warm-up steps, the candidates timed in alternation; "
            "step = forward + backward + AdamW. 'ours' uses fused AdamW as our configs do; 'diffusers' uses "
            "torch.optim.AdamW's defaults as diffusers' training scripts do; 'diffusers + fused AdamW' isolates "
            "the network. FLOPs counted by torch.utils.flop_counter: ours runs fewer than the architecture's "
            "nominal count (nearest-x2 + 3x3 conv as four 2x2 convs, ldm/networks/resample.py), so utilisation "
            "is given as nominal FLOPs (diffusers' count for the identical architecture) per second of our step. "
            + ("bf16-mixed not run: bf16 is not native on this CPU (it would time an emulation). "
               if "bf16-mixed" not in precisions else "")
            + ("'compiled' = torch.compile (default mode, Inductor) of a copy with its own weights and fused AdamW, "
               "timed in the same alternation after its two compiling steps; 'speed-up compiled vs diffusers' is "
               "against diffusers as its training scripts run it (eager, default AdamW). " if args.compile else "")
            + "Ceilings here: " + ", ".join(f"{p} matmul (2048^3) {m:.0f} GFLOP/s, 3x3 conv fwd+bwd {c:.0f} GFLOP/s"
                                            for p, (m, c) in ceilings.items())
            + f". Memory: {memory}. Host allocator: glibc's default for both (the framework's "
            "host_allocator=retain, which train.py applies, is measured in benchmarks/results/allocator.md).\n\n"
            + markdown_table(rows, list(rows[0])))
    path = write_result("train_step" if device == "cpu" else f"train_step_{device}",
                        "Training step: ours vs diffusers (identical architectures)", body)
    print(body, f"\nwritten to {path}", sep="\n")



if __name__ == "__main__":
    main()
