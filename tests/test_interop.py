"""Interop: CompVis/SD checkpoints and diffusers folders, both ways, against diffusers itself as the oracle."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)

from ldm.interop.compvis import (
    EMA_PREFIX,
    autoencoder_args_from_compvis,
    ema_key,
    load_compvis_checkpoint,
    unet_args_from_compvis,
)
from ldm.interop.diffusers import (
    load_diffusers_state,
    save_diffusers_folder,
    to_diffusers_state,
    unet_from_diffusers,
    vae_from_diffusers,
)
from ldm.networks.autoencoder import AutoencoderKL
from ldm.networks.unet import UNet

UNET_PARAMS = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": 2,
               "attention_resolutions": [2, 4], "channel_mult": [1, 2, 2], "num_head_channels": 16,
               "transformer_depth": 1, "context_dim": 24, "use_linear_in_transformer": True,
               "use_spatial_transformer": True, "legacy": False}
DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
COMPVIS_CONFIG = {"model": {"params": {
    "scale_factor": 0.18215,
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": UNET_PARAMS},
    "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                           "params": {"embed_dim": 4, "ddconfig": DDCONFIG}}}}}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values everywhere (zero-initialised output layers would hide mapping mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def unet_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 700]),
            torch.randn(2, 5, 24, generator=gen))


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def compvis_state(unet: UNet, ae: AutoencoderKL, ema: UNet | None = None) -> dict[str, torch.Tensor]:
    state = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    state |= {"first_stage_model." + k: v for k, v in ae.state_dict().items() if not k.startswith("latent_")}
    if ema is not None:
        state |= {ema_key(k): v for k, v in ema.state_dict().items()}
        state[EMA_PREFIX + "num_updates"] = torch.tensor(10)
    return state


@torch.no_grad()
def test_our_compvis_layout_is_what_diffusers_converts_from_compvis():
    """diffusers' own CompVis->diffusers converter, fed our weights under CompVis prefixes, gives a diffusers
    model that computes what ours computes: our key layout and maths are CompVis'."""
    unet = randomize(UNet(**unet_args_from_compvis(UNET_PARAMS)), 0)
    ae = randomize(AutoencoderKL(**autoencoder_args_from_compvis(COMPVIS_CONFIG["model"]["params"]
                                                                 ["first_stage_config"]["params"])), 1)
    ckpt = compvis_state(unet, ae)
    config = create_unet_diffusers_config_from_ldm(COMPVIS_CONFIG, ckpt, image_size=64)
    theirs = UNet2DConditionModel(**config).eval()
    theirs.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True)
    x, t, ctx = unet_inputs()
    assert_close(unet(x, t, context=ctx), theirs(x, t, encoder_hidden_states=ctx).sample)

    vae_config = create_vae_diffusers_config_from_ldm(COMPVIS_CONFIG, ckpt, image_size=32)
    their_vae = DiffusersVAE(**vae_config).eval()
    their_vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vae_config), strict=True)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    assert_close(ae.encode(img).mode(), their_vae.encode(img).latent_dist.mode())
    z = torch.randn(2, 4, 16, 16)
    assert_close(ae.decode(z), their_vae.decode(z).sample)


def test_load_compvis_checkpoint_with_ema_and_errors(tmp_path):
    unet = randomize(UNet(**unet_args_from_compvis(UNET_PARAMS)), 0)
    ema = randomize(UNet(**unet_args_from_compvis(UNET_PARAMS)), 2)
    ae = randomize(AutoencoderKL(**autoencoder_args_from_compvis(COMPVIS_CONFIG["model"]["params"]
                                                                 ["first_stage_config"]["params"])), 1)
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": compvis_state(unet, ae, ema), "global_step": 5}, path)
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        loaded_ema, loaded_ae = load_compvis_checkpoint(path, COMPVIS_CONFIG, use_ema=True)
        loaded_raw, _ = load_compvis_checkpoint(path, COMPVIS_CONFIG, use_ema=False)
        assert_close(loaded_ema.eval()(x, t, context=ctx), ema(x, t, context=ctx))
        assert_close(loaded_raw.eval()(x, t, context=ctx), unet(x, t, context=ctx))
    assert torch.allclose(loaded_ae.latent_std, torch.full((4,), 1 / 0.18215))
    wrong = {"model": {"params": {**COMPVIS_CONFIG["model"]["params"],
                                  "unet_config": {"params": {**UNET_PARAMS, "model_channels": 64}}}}}
    with pytest.raises(ValueError, match=r"does not match our UNet .* shape mismatches "
                                         r"\['time_embed.0.weight: \(128, 32\) vs \(256, 64\)"):
        load_compvis_checkpoint(path, wrong)
    deeper = {"model": {"params": {**COMPVIS_CONFIG["model"]["params"],
                                   "unet_config": {"params": {**UNET_PARAMS, "channel_mult": [1, 2, 2, 2]}}}}}
    with pytest.raises(ValueError, match=r"missing keys \[.*\] \(\d+ in all\)"):
        load_compvis_checkpoint(path, deeper)


@torch.no_grad()
def test_unet_to_diffusers_and_back(tmp_path):
    ours = randomize(UNet(**unet_args_from_compvis(UNET_PARAMS) | {"adm_in_channels": 6}), 3)
    folder = save_diffusers_folder(ours, tmp_path / "unet")
    theirs = UNet2DConditionModel.from_pretrained(folder).eval()
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())
    x, t, ctx = unet_inputs()
    y = torch.randn(2, 6)
    assert_close(ours(x, t, context=ctx, y=y), theirs(x, t, encoder_hidden_states=ctx, class_labels=y).sample)

    other = randomize(UNet2DConditionModel(**UNet2DConditionModel.load_config(folder)), 4)
    other.save_pretrained(tmp_path / "other")
    back = unet_from_diffusers(tmp_path / "other").eval()
    assert_close(back(x, t, context=ctx, y=y), other(x, t, encoder_hidden_states=ctx, class_labels=y).sample)


@torch.no_grad()
def test_autoencoder_to_diffusers_and_back(tmp_path):
    ours = randomize(AutoencoderKL(**autoencoder_args_from_compvis(COMPVIS_CONFIG["model"]["params"]
                                                                   ["first_stage_config"]["params"])), 5)
    ours.latent_std.fill_(2.0)
    folder = save_diffusers_folder(ours, tmp_path / "vae")
    theirs = DiffusersVAE.from_pretrained(folder).eval()
    assert theirs.config.scaling_factor == pytest.approx(0.5)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    assert_close(ours.encode(img).mode(), theirs.encode(img).latent_dist.mode())
    z = torch.randn(2, 4, 16, 16)
    assert_close(ours.decode(z), theirs.decode(z).sample)
    randomize(theirs, 6).save_pretrained(tmp_path / "other")
    back = vae_from_diffusers(tmp_path / "other").eval()
    assert_close(back.decode(z), theirs.decode(z).sample)
    assert torch.allclose(back.latent_std, torch.full((4,), 2.0))


def test_mismatched_diffusers_weights_name_the_keys():
    ours = UNet(**unet_args_from_compvis(UNET_PARAMS))
    state = to_diffusers_state(ours)
    state.pop("conv_in.weight")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['conv_in.weight'\] \(1 in all\), unexpected keys "
                                         r"\['extra.weight'\] \(1 in all\)"):
        load_diffusers_state(ours, state, "their.safetensors")
    with pytest.raises(ValueError, match="attention inside the levels"):
        save_diffusers_folder(AutoencoderKL(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16],
                                            resolution=32), "unused")
