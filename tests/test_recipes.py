"""The paper recipes (configs/experiment/{kl_f8_256,kl_f4_256,cin256_ldm4,cin256_ldm8,t2i256_openclip*}.yaml):
their real sizes on the meta device against the published counts, the global batch split over devices, and a
few training steps of each with tiny widths on tiny data of the layout it is meant for."""

from __future__ import annotations

import pytest
import torch
from omegaconf.errors import InterpolationResolutionError

from ldm.data.folder import folder_to_shards
from ldm.recipes import PAPER, RECIPES, recipe_config, recipe_size
from ldm.training import train
from tests.conftest import ROOT, TINY_RES, compose_cfg
from tests.synthetic_data import img2dataset_shards


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_builds_on_the_meta_device_at_its_published_size(name):
    size = recipe_size(name)
    print(f"\n{name}: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in size.params.items())
          + f"; trains {size.trainable / 1e6:.2f}M; GFLOP per training image "
          + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in size.train_flops.items()))
    assert size.resolution == 256
    assert size.train_flops_per_image > 0 and all(v >= 0 for v in size.train_flops.values())
    published = PAPER.get(name)
    if published is not None:
        ours = size.counted(published.counts)
        assert abs(ours - published.params) <= published.rounded_to, (name, ours, published)
    if name.startswith("cin256"):  # the U-Net's FLOPs grow with the latent area: f=4 has 4x the positions of f=8
        assert size.sample_step_flops > 0 and size.decode_flops > 0


def test_the_paper_global_batch_splits_over_devices_nodes_and_accumulation():
    assert recipe_config("cin256_ldm4", "trainer.devices=8").data.batch_size == 150
    assert recipe_config("cin256_ldm4", "trainer.devices=4", "trainer.num_nodes=2",
                         "trainer.accumulate_grad_batches=3").data.batch_size == 50
    assert recipe_config("t2i256_openclip", "trainer.devices=[0,1,2,3,4,5,6,7]").data.batch_size == 256
    assert recipe_config("cin256_ldm8").data.batch_size == 64  # one CPU device
    cfg = recipe_config("cin256_ldm4", "trainer.devices=7")
    with pytest.raises(InterpolationResolutionError, match=r"global_batch=1200 does not split over "
                                                           r"trainer.devices=7 \(7 here\)"):
        _ = cfg.data.batch_size


def _common(tmp_path, shards, name: str) -> list[str]:
    return [f"experiment={name}", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run",
            f"data.train_shards={shards}", f"data.val_shards={shards}", f"data.resolution={TINY_RES}",
            "data.batch_size=4", "data.val_batch_size=4", "data.num_workers=0", "data.samples_per_epoch=8",
            "data.val_limit=4", "data.shuffle_buffer=4", "trainer.accelerator=cpu", "trainer.precision=32-true",
            "trainer.max_steps=2", "trainer.log_every_n_steps=1", "logger=csv", "callbacks.image_logger=null"]


# Tiny widths for each recipe; everything else (depth pattern, attention levels, heads, schedule, optimiser,
# EMA, learning-rate schedule, prediction) is the recipe's own.
TINY = {
    "kl_f8_256": ["model.autoencoder.ch=8", "model.autoencoder.num_res_blocks=1", "model.loss.discriminator.ch=8",
                  "model.loss.perceptual_weight=0", "model.loss.perceptual=null"],
    "cin256_ldm4": ["model.unet.model_channels=32", "model.conditioner.embedders.0.embed_dim=16",
                    "model.conditioner.embedders.0.num_classes=3", "model.sampling.class_labels=[0,1,2]"],
    "cin256_ldm8": ["model.unet.model_channels=32", "model.unet.num_head_channels=8",
                    "model.conditioner.embedders.0.embed_dim=16", "model.conditioner.embedders.0.num_classes=3",
                    "model.sampling.class_labels=[0,1,2]"],
    "t2i256_openclip": ["model.unet.model_channels=32", "model.unet.num_head_channels=8",
                        "model.unet.channel_mult=[1,2,2]", "model.conditioner.embedders.0.pretrained=null",
                        "+model.conditioner.embedders.0.arch={width:16,layers:1,heads:2,context_length:8}",
                        "model.conditioner.embedders.0.embed_dim=16"],
}
TINY["kl_f4_256"] = TINY["kl_f8_256"]
TINY["t2i256_openclip_zsnr"] = TINY["t2i256_openclip"]
FIRST_STAGE = {"cin256_ldm4": "ae_f4", "cin256_ldm8": "ae_f8", "t2i256_openclip": "ae_f8",
               "t2i256_openclip_zsnr": "ae_f8"}


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_trains_a_few_steps_with_tiny_widths_on_data_of_its_layout(name, tmp_path, imagenet_layout,
                                                                                 export_dir):
    if name.startswith("cin256"):  # ImageNet's class folders, converted with their labels
        shards = tmp_path / "shards"
        folder_to_shards(imagenet_layout, shards, resolution=TINY_RES, samples_per_shard=4, labels="folders")
    else:  # image + caption shards as img2dataset writes them
        shards = img2dataset_shards(tmp_path / "laion")
    overrides = _common(tmp_path, shards, name) + TINY[name]
    if name in FIRST_STAGE:
        overrides.append(f"model.first_stage={export_dir / FIRST_STAGE[name]}")
    cfg = compose_cfg(overrides)
    export = tmp_path / "exports" / name
    assert cfg.task_name == name and str(cfg.paths.export_dir) == str(tmp_path / "exports")
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 2  # optimiser steps (stage 1: an autoencoder and a discriminator step per batch)
    assert (export / "model.safetensors").is_file()
    lr = ckpt["optimizer_states"][0]["param_groups"][0]["lr"]
    if name.startswith(("cin256", "t2i256")):
        assert cfg.model.prediction == ("v" if name.endswith("zsnr") else "eps")
    if name == "cin256_ldm4":  # lr 1e-4 as given, constant, no EMA (cin256-v2)
        assert lr == pytest.approx(1e-4) and "averaging_state" not in ckpt
    if name == "cin256_ldm8":  # base lr 1e-6 x the global batch (4 here), constant, EMA
        assert lr == pytest.approx(4e-6) and "averaging_state" in ckpt
    if name.startswith("t2i256"):  # warm-up to 1e-4 over 10k steps: still at its start
        assert 0 < lr < 1e-6
    if name.startswith("kl_"):  # 4.5e-6 x the global batch of 4
        assert lr == pytest.approx(1.8e-5)


def test_the_documented_recipe_commands_compose_as_written():
    text = (ROOT / "docs" / "recipes.md").read_text().replace("\\\n", " ")
    commands = [line.split("#")[0].split()[2:] for line in text.splitlines() if line.startswith("python train.py")]
    assert len(commands) == 3
    for args in commands:
        cfg = compose_cfg([a for a in args if not a.startswith("trainer=")] + ["trainer.accelerator=cpu"])
        assert cfg.task_name in RECIPES and cfg.data.resolution == 256
        assert cfg.data.batch_size > 0
        if "first_stage" in cfg.model:  # stage 2 reads the export of a first-stage recipe
            assert cfg.model.first_stage.rsplit("/", 1)[-1] in RECIPES
