"""torch.compile: both networks and the stage-2 loss trace as one graph each; compiled runs keep eager keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from ldm.networks.autoencoder import AutoencoderKL
from ldm.networks.unet import UNet
from ldm.training import train
from ldm.utils.config import auto_compile


def _graph_breaks(fn, *args, **kwargs) -> tuple[int, list]:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args, **kwargs)
    return explanation.graph_break_count, [str(r.reason) for r in explanation.break_reasons]


@pytest.mark.parametrize("use_linear", [True, False])
def test_unet_forward_and_loss_is_one_graph(use_linear):
    torch.manual_seed(0)
    unet = UNet(in_channels=4, model_channels=16, num_res_blocks=1, channel_mult=[1, 2], attention_resolutions=[1, 2],
                num_head_channels=8, context_dim=16, adm_in_channels=8, use_linear_in_transformer=use_linear)
    x, t, ctx, y = torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,)), torch.randn(2, 5, 16), torch.randn(2, 8)
    assert _graph_breaks(lambda: (unet(x, t, context=ctx, y=y) - x).pow(2).mean()) == (0, [])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the bf16 attention path included
        assert _graph_breaks(lambda: (unet(x, t, context=ctx, y=y).float() - x).pow(2).mean()) == (0, [])


def test_autoencoder_forward_and_loss_is_one_graph():
    torch.manual_seed(0)
    ae = AutoencoderKL(ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[16], resolution=32, z_channels=4,
                       embed_dim=4)
    x = torch.randn(2, 3, 32, 32)

    def loss():
        rec, posterior = ae(x)
        return (rec - x).abs().sum((1, 2, 3)).mean() + 1e-6 * posterior.kl().mean()

    assert _graph_breaks(loss) == (0, [])


def test_stage2_loss_is_one_graph(make_ldm_cfg):
    cfg = make_ldm_cfg("ldm_f8")
    stage = instantiate(cfg.model)
    z0 = torch.randn(3, 4, 4, 4)
    t = torch.randint(0, 1000, (3,))
    cond = stage.conditioner({"caption": ["a photo of a bag", "", "a photo of a coat"]})
    assert _graph_breaks(stage.denoising_loss, z0, t, torch.randn_like(z0), cond["context"], cond["y"]) == (0, [])


def test_compile_defaults_on_for_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not auto_compile("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_compile("auto") and auto_compile("gpu") and not auto_compile("cpu")


def test_compiled_run_writes_the_keys_of_an_eager_one(make_ldm_cfg, tmp_path, monkeypatch):
    """A compiled training run (AOT-autograd tracing of forward and backward; the eager backend keeps the test
    short) writes checkpoints and exports whose keys are exactly those of an eager run."""
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, backend="aot_eager"))
    keys = {}
    for compiled in (False, True):
        out = tmp_path / f"compiled_{compiled}"
        cfg = make_ldm_cfg("ldm_f8", "trainer.max_steps=2", f"model.compile={str(compiled).lower()}",
                           f"paths.output_dir={out}", f"callbacks.export_pipeline.dirpath={out}/export",
                           "model.sampling.num_images=1")
        train(cfg)
        ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
        exported = load_file(next(Path(out, "export").glob("*.safetensors")))
        keys[compiled] = (set(ckpt["state_dict"]), set(ckpt["current_model_state"]), set(exported))
    assert keys[True] == keys[False]
    assert not any("_orig_mod" in k or k.startswith("module.") for group in keys[True] for k in group)


def test_gpu_runs_get_device_sized_batches_and_compile(monkeypatch):
    from tests.conftest import compose_cfg

    cpu = compose_cfg(["experiment=ldm_f8", "trainer.accelerator=cpu"])
    assert (cpu.data.batch_size, cpu.data.prepare.batch_size, cpu.model.compile) == (64, 128, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = compose_cfg(["experiment=ldm_f8"])
    assert (gpu.data.batch_size, gpu.data.prepare.batch_size, gpu.model.compile) == (512, 1024, True)
    ae = compose_cfg(["experiment=ae_f8"])
    assert (ae.data.batch_size, ae.data.val_batch_size, ae.model.compile) == (64, 256, True)
    assert compose_cfg(["experiment=ae_f8", "trainer.accelerator=cpu"]).data.batch_size == 16
