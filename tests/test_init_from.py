"""model.init_from: fine-tuning starts from an export, a checkpoint, a CompVis/SD checkpoint or a diffusers folder,
and reports what matched."""

from __future__ import annotations

import logging

import pytest
import torch

from ldm.interop.diffusers import save_diffusers_folder
from ldm.training import build


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def source(make_ldm_cfg):
    torch.manual_seed(123)
    return build(make_ldm_cfg("ldm_f8").model)


def test_stage_two_from_our_export_and_checkpoint_formats(make_ldm_cfg, source, tmp_path, caplog):
    pipe = source.pipeline()
    from omegaconf import OmegaConf

    pipe.config = OmegaConf.to_container(make_ldm_cfg("ldm_f8").model, resolve=True)
    pipe.save_pretrained(tmp_path / "export")
    with caplog.at_level(logging.INFO, logger="ldm.stages.init_from"):
        stage = build(make_ldm_cfg("ldm_f8", f"model.init_from={tmp_path}/export").model)
    assert _equal(stage.unet, source.unet) and _equal(stage.conditioner, source.conditioner)
    assert "0 missing" in caplog.text and "tensors loaded" in caplog.text

    # CompVis / SD layout: the U-Net under model.diffusion_model.*; the conditioner is reported missing
    torch.save({"state_dict": {f"model.diffusion_model.{k}": v for k, v in source.unet.state_dict().items()}},
               tmp_path / "sd.ckpt")
    stage = build(make_ldm_cfg("ldm_f8", f"model.init_from={tmp_path}/sd.ckpt").model)
    assert _equal(stage.unet, source.unet) and not _equal(stage.conditioner, source.conditioner)


def test_stage_two_from_a_diffusers_pipeline_folder(make_ldm_cfg, tmp_path):
    wide = "model.unet.model_channels=32"  # diffusers' UNet needs 32-group GroupNorm
    torch.manual_seed(5)
    source = build(make_ldm_cfg("ldm_f8", wide).model)
    save_diffusers_folder(source.unet, tmp_path / "pipe" / "unet")
    stage = build(make_ldm_cfg("ldm_f8", wide, f"model.init_from={tmp_path}/pipe").model)
    assert _equal(stage.unet, source.unet)


def test_a_file_of_the_other_stage_is_refused(make_ldm_cfg, export_dir):
    with pytest.raises(ValueError, match=r"init_from=.*ae_f8/model.safetensors: none of its .* tensors matches"):
        build(make_ldm_cfg("ldm_f8", f"model.init_from={export_dir}/ae_f8/model.safetensors").model)
    with pytest.raises(FileNotFoundError, match=r"model.init_from=.*nowhere: no such file"):
        build(make_ldm_cfg("ldm_f8", "model.init_from=/nowhere").model)


def test_stage_one_from_an_autoencoder_export(make_cfg, export_dir):
    from ldm.checkpoints import load_first_stage

    cfg = make_cfg("ae_f8", f"model.init_from={export_dir}/ae_f8", "model.autoencoder.ch_mult=[1,2,4,4]",
                   "model.autoencoder.num_res_blocks=1", "model.autoencoder.z_channels=4")
    stage = build(cfg.model)
    assert _equal(stage.autoencoder, load_first_stage(export_dir / "ae_f8"))
