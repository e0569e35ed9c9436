"""A diffusers pipeline folder exported from our model loads with diffusers.DiffusionPipeline and samples what our
pipeline samples."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoints import FIRST_STAGE, export_folder, load_first_stage
from ldm.networks.autoencoder import AutoencoderKL
from ldm.pipeline import LatentDiffusionPipeline
from ldm.training import build
from tests.conftest import TINY_RES


@pytest.fixture
def diffusers_ready_export(make_ldm_cfg, tmp_path):
    """A tiny text-conditional model whose widths diffusers' 32-group GroupNorm accepts, exported."""
    torch.manual_seed(0)
    arch = {"ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "resolution": TINY_RES, "z_channels": 4,
            "embed_dim": 4, "attn_resolutions": [], "mid_attn": True}
    ae = AutoencoderKL(**arch)
    ae.latent_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    ae.latent_std.copy_(torch.tensor([0.5, 1.5, 0.8, 1.2]))
    export_folder(tmp_path / "ae", ae, FIRST_STAGE, {"_target_": "ldm.networks.autoencoder.AutoencoderKL", **arch},
                  {"downsampling_factor": ae.downsampling_factor})
    cfg = make_ldm_cfg("ldm_f8", f"model.first_stage={tmp_path}/ae", "model.unet.model_channels=32")
    stage = build(cfg.model)
    with torch.no_grad():
        for p in stage.unet.parameters():  # a U-Net whose output depends on its input (out is zero-initialised)
            p.add_(torch.randn_like(p) * 0.02)
    pipe = LatentDiffusionPipeline(stage.unet, stage.conditioner, load_first_stage(tmp_path / "ae"), stage.schedule,
                                   prediction=stage.prediction, latent_norm=stage.latent_norm, spacing=stage.spacing)
    pipe.config = OmegaConf.to_container(cfg.model, resolve=True)
    return pipe.save_pretrained(tmp_path / "ldm")


def test_exported_pipeline_loads_in_diffusers_and_matches_ours(diffusers_ready_export, tmp_path):
    from diffusers import DiffusionPipeline

    from ldm.interop.diffusers_pipeline import export_diffusers_pipeline

    out = export_diffusers_pipeline(diffusers_ready_export, tmp_path / "diffusers")
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["latent_std"] == pytest.approx(
        [0.5, 1.5, 0.8, 1.2])
    theirs = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    theirs.set_progress_bar_config(disable=True)
    ours = LatentDiffusionPipeline.from_pretrained(diffusers_ready_export)
    prompts = ["a photo of a bag", "a photo of a coat"]
    noise, _ = ours.prepare_latents([0, 1], 0, ours.noise_levels("dpmpp_2m", 3), None)
    a = ours(prompt=prompts, steps=3, cfg_scale=3.0, seed=0, output_type="tensor")
    b = theirs(prompt=prompts, num_inference_steps=3, guidance_scale=3.0, latents=noise.clone(), output_type="pt")
    assert a.shape == b.shape
    print(f"max |ours - diffusers| = {(a - b).abs().max().item():.2e}")
    assert (a - b).abs().max().item() < 1e-3, (a - b).abs().max().item()
    limited = {"guidance_interval": [0.5, 5.0], "guidance_rescale": 0.7}  # as our sampler: the same images
    a2 = ours(prompt=prompts, steps=3, cfg_scale=3.0, seed=0, output_type="tensor", **limited)
    b2 = theirs(prompt=prompts, num_inference_steps=3, guidance_scale=3.0, latents=noise.clone(), output_type="pt",
                **limited)
    assert (a2 - b2).abs().max().item() < 1e-5 < (a2 - a).abs().max().item()  # equal; and not the plain guidance
    with pytest.raises(FileExistsError, match="exists; choose a new folder"):
        export_diffusers_pipeline(diffusers_ready_export, out)
