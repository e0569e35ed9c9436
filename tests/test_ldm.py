"""Stage 2 end to end on tiny configs: every ldm experiment, export, sampling CLI, img2img, inpainting."""

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.manifest import read_manifest
from ldm.pipeline import LatentDiffusionPipeline
from ldm.training import train
from ldm.utils.files import weights_fingerprint
from tests.conftest import ROOT, compose_cfg, ldm_overrides
from tests.script_runner import run_script

EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("ldm_*.yaml"))


def test_every_ldm_experiment_is_found():
    assert {"ldm_f4", "ldm_f8", "ldm_f16"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run_every_ldm_experiment(make_ldm_cfg, experiment):
    cfg = make_ldm_cfg(experiment, "debug=fdr")
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/loss"])
    cache = Path(cfg.data.prepare.out_dir)
    manifest = read_manifest(cache)
    assert manifest["first_stage_sha256"] == weights_fingerprint(cfg.model.first_stage)
    assert manifest["embed_dim"] == cfg.model.unet.in_channels


def test_class_conditional_model_trains_samples_and_guides(make_ldm_cfg, tmp_path):
    cfg = make_ldm_cfg("ldm_f8", "model/conditioner=class", "trainer.max_steps=3", "data.samples_per_epoch=8",
                       "model.noise_offset=0.1", "trainer.gradient_clip_val=1.0")  # stage-2 knobs train too
    train(cfg)
    pipe = LatentDiffusionPipeline.from_pretrained(Path(cfg.paths.export_dir) / "ldm_f8")
    assert pipe.conditioner.input_keys == ["class_label"]
    images = pipe(class_labels=[7, 1], num_images=2, steps=3, cfg_scale=3.0, output_type="tensor")
    assert images.shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="conditioned on class labels"):
        pipe(prompt="a photo of a bag", steps=2)
    every_class = pipe(steps=2, output_type="tensor")  # no labels: one image per class
    assert every_class.shape == (10, 3, 32, 32)
    torch.testing.assert_close(every_class[7:8], pipe(class_labels=7, steps=2, seed=7, output_type="tensor"))


def test_noise_offset_shifts_the_training_noise_per_channel(make_ldm_cfg):
    from ldm.training import build

    stage = build(make_ldm_cfg("ldm_f8", "model.noise_offset=0.5").model)
    drawn = {}
    stage.denoising_loss = lambda z0, t, noise, context, y: drawn.setdefault("noise", noise).flatten(1).mean(1)
    torch.manual_seed(0)
    stage.loss({"latent": torch.zeros(256, 8, 4, 4), "caption": ["a photo of a bag"] * 256})
    channel_means = drawn["noise"].mean(dim=(2, 3))  # N(0, 1/16) without the offset, N(0, 1/16 + 0.25) with it
    assert 0.45 < channel_means.std().item() < 0.6
    with pytest.raises(ValueError, match=r"model.noise_offset=-1.0: expected >= 0"):
        build(make_ldm_cfg("ldm_f8", "model.noise_offset=-1.0").model)


def test_missing_first_stage_names_the_command(make_ldm_cfg, tmp_path):
    cfg = make_ldm_cfg("ldm_f8", f"model.first_stage={tmp_path}/nowhere", "debug=fdr")
    with pytest.raises(FileNotFoundError, match=r"python train.py experiment=ae_f8"):
        train(cfg)


def test_unet_channels_must_match_the_first_stage(make_ldm_cfg):
    cfg = make_ldm_cfg("ldm_f8", "model.unet.in_channels=3", "debug=fdr")
    with pytest.raises(ValueError, match=r"model.unet.in_channels=3 .* embed_dim=4 latent channels"):
        train(cfg)
    cfg = make_ldm_cfg("ldm_f8", "model.unet.context_dim=32", "debug=fdr")
    with pytest.raises(ValueError, match=r"model.unet.context_dim=32 but the conditioner's context width is 16"):
        train(cfg)


@pytest.mark.parametrize("override,match", [("model.timestep_buckets=0", r"model\.timestep_buckets=0: expected 1 to"),
                                            ("model.timestep_buckets=1001", r"model\.timestep_buckets=1001")])
def test_bad_stage_settings_name_the_key(make_ldm_cfg, override, match):
    from ldm.training import build

    with pytest.raises(ValueError, match=match):
        build(make_ldm_cfg("ldm_f8", override).model)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_dir, export_dir):
    """A tiny ldm_f8 trained for 6 steps with EMA, checkpointed and exported; trained once per session (per test
    worker) in a folder of its own, with its own copy of the first stage, and only read by the tests."""
    root = tmp_path_factory.mktemp("trained_ldm")
    shutil.copytree(export_dir / "ae_f8", root / "exports" / "ae_f8")
    cfg = compose_cfg(ldm_overrides(root, data_dir, root / "exports", "ldm_f8", "trainer.max_steps=6",
                                    "data.samples_per_epoch=16"))
    train(cfg)
    return cfg


def test_training_checkpoints_ema_and_exports(trained):
    out = Path(trained.paths.output_dir)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert not any(k.startswith("first_stage") for k in raw)  # the frozen first stage is not trained state
    key = "unet.input_blocks.0.0.weight"
    assert not torch.equal(ema[key], raw[key])  # EMA differs from the raw weights
    export = Path(trained.paths.export_dir) / "ldm_f8"
    assert (export / "model.safetensors").is_file() and (export / "first_stage" / "model.safetensors").is_file()
    metrics = (out / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "train/loss_t0-249" in metrics and "val/loss" in metrics
    assert list((out / "images").glob("val_samples_*.png"))


def test_exported_and_checkpoint_pipelines_agree(trained):
    export = Path(trained.paths.export_dir) / "ldm_f8"
    ckpt = Path(trained.paths.output_dir) / "checkpoints" / "last.ckpt"
    a = LatentDiffusionPipeline.from_pretrained(export)
    b = LatentDiffusionPipeline.from_pretrained(ckpt)
    kw = dict(prompt=["a photo of a bag", "a photo of a coat"], steps=3, cfg_scale=3.0, seed=5, output_type="tensor")
    torch.testing.assert_close(a(**kw), b(**kw))
    raw = LatentDiffusionPipeline.from_pretrained(ckpt, ema=False)
    assert not torch.allclose(raw(**kw), b(**kw))
    imgs = a(prompt="a photo of a bag", num_images=3, steps=2, seed=0)
    assert len(imgs) == 3 and imgs[0].size == (32, 32)
    again = a(prompt=["a photo of a coat", "a photo of a bag"], num_images=3, steps=2, seed=0, output_type="tensor")
    torch.testing.assert_close(again[3], a(prompt="a photo of a bag", num_images=3, steps=2, seed=3,
                                           output_type="tensor")[0])  # image i uses seed + i


def test_img2img_strength_zero_is_the_reconstruction_and_inpainting_keeps_the_known_region(trained):
    pipe = LatentDiffusionPipeline.from_pretrained(Path(trained.paths.export_dir) / "ldm_f8")
    init = torch.rand(1, 3, 32, 32) * 2 - 1
    recon = pipe.decode(pipe.encode(init))
    out = pipe(prompt="a photo of a bag", init_image=init, strength=0.0, steps=10, output_type="tensor")
    torch.testing.assert_close(out, recon)
    changed = pipe(prompt="a photo of a bag", init_image=init, strength=0.6, steps=10, output_type="tensor")
    assert not torch.allclose(changed, recon)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, 16:] = 1.0  # repaint the right half
    painted = pipe(prompt="a photo of a bag", init_image=init, mask=mask, strength=1.0, steps=5,
                   negative_prompt="a photo of a coat", output_type="tensor")
    torch.testing.assert_close(painted[..., :16], init[..., :16])
    assert not torch.allclose(painted[..., 16:], init[..., 16:])


def _sample_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_script(ROOT / "sample.py", f"out_dir={tmp_path}/samples", "steps=2", "num_images=2", *args, cwd=tmp_path)


def test_sample_cli_end_to_end(trained, tmp_path):
    ckpt = Path(trained.paths.output_dir) / "checkpoints" / "last.ckpt"
    res = _sample_cli(tmp_path, f"model_path={ckpt}", "prompt=[a photo of a bag,a photo of a coat]",
                      "negative_prompt=a photo of a shirt", "sampler=ddim")
    assert res.returncode == 0, res.stderr[-2000:]
    grid = tmp_path / "samples" / "grid.png"
    assert f"sample grid: {grid}" in res.stdout
    assert Image.open(grid).size == (2 * 34 + 2, 2 * 34 + 2)
    assert len(list((tmp_path / "samples").glob("0*_a_photo_of_a_*.png"))) == 4


def test_sample_cli_errors(trained, tmp_path, make_cfg):
    res = _sample_cli(tmp_path, f"model_path={tmp_path}/missing.ckpt")
    assert res.returncode != 0 and "no model at" in res.stderr and "missing.ckpt" in res.stderr
    ae_cfg = make_cfg("ae_f8", "trainer.max_steps=2", "callbacks.export_first_stage=null",
                      f"paths.output_dir={tmp_path}/ae_run")
    train(ae_cfg)
    res = _sample_cli(tmp_path, f"model_path={tmp_path}/ae_run/checkpoints/last.ckpt")
    assert res.returncode != 0 and "is an autoencoder (stage 1) checkpoint" in res.stderr
    first_stage = Path(trained.paths.export_dir) / "ae_f8"
    res = _sample_cli(tmp_path, f"model_path={first_stage}")
    assert res.returncode != 0 and "holds a 'first_stage' export, not a 'latent_diffusion'" in res.stderr


@pytest.mark.parametrize("kwargs,match", [(dict(num_images=0), r"num_images=0: expected an integer >= 1"),
                                          (dict(batch_size=0), r"batch_size=0: expected an integer >= 1"),
                                          (dict(eta=-1.0, sampler="ddim"), r"eta=-1\.0: expected >= 0"),
                                          (dict(eta=0.5), r"sampler 'dpmpp_2m' does not use \['eta'\]"),
                                          (dict(cfg_scale=-3), r"cfg_scale=-3: expected a number >= 0"),
                                          (dict(steps=0), r"steps=0: expected an integer >= 1"),
                                          (dict(output_type="np"), r"output_type='np': expected 'pil' or 'tensor'"),
                                          (dict(class_labels=3), r"class_labels given, but this model is conditioned "
                                                                 r"on \['caption'\]")])
def test_pipeline_refuses_bad_arguments_by_name(trained, kwargs, match):
    pipe = LatentDiffusionPipeline.from_pretrained(Path(trained.paths.export_dir) / "ldm_f8")
    with pytest.raises(ValueError, match=match):
        pipe(prompt="a photo of a bag", **({"steps": 2} | kwargs))


def test_latent_cache_is_reused_and_rebuilt_for_another_first_stage(make_ldm_cfg, export_dir):
    from ldm.latent_cache import prepare_latent_cache

    cfg = make_ldm_cfg("ldm_f8")
    prep = cfg.data.prepare
    splits = {"val": prep.splits.val}
    from ldm.data.fashion_mnist import prepare

    prepare(prep.image_prepare.out_dir, resolution=32, samples_per_shard=24, limit=96)
    out = Path(prep.out_dir).parent / "custom"
    prepare_latent_cache(export_dir / "ae_f8", splits, out, num_workers=0)
    stamp = (out / "val" / "val-000000.tar").stat().st_mtime_ns
    prepare_latent_cache(export_dir / "ae_f8", splits, out, num_workers=0)
    assert (out / "val" / "val-000000.tar").stat().st_mtime_ns == stamp
    prepare_latent_cache(export_dir / "ae_f4", splits, out, num_workers=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["embed_dim"] == 3 and manifest["first_stage_sha256"] == weights_fingerprint(export_dir / "ae_f4")


def test_ema_averages_trained_weights_with_warmup_and_leaves_frozen_ones():
    from ldm.callbacks.ema import EMAModel, ema_decay

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    net[1].requires_grad_(False)
    net.register_buffer("count", torch.tensor(0))
    net.register_buffer("mask", torch.tensor([0.0, float("-inf")]))  # buffers follow the model, -inf included
    ema = EMAModel(net, decay=0.9, warmup=True)
    expected = frozen_after_copy = None
    for step in range(4):
        with torch.no_grad():
            net[0].weight.add_(1.0)
            net[1].weight.add_(10.0)  # a frozen weight that changes anyway is not averaged after the first copy
            net.count += 1
            net.mask[0] += 1
        current = net[0].weight.detach().clone()
        d = ema_decay(0.9, True, step)
        expected = current if step == 0 else d * expected + (1 - d) * current
        frozen_after_copy = net[1].weight.detach().clone() if step == 0 else frozen_after_copy
        ema.update_parameters(net)
        torch.testing.assert_close(ema.module[0].weight, expected)
        torch.testing.assert_close(ema.module[1].weight, frozen_after_copy)
        assert int(ema.module.count) == step + 1 and int(ema.n_averaged) == step + 1
        assert ema.module.mask.tolist() == [step + 1, float("-inf")]
    assert [ema_decay(0.9, True, n) for n in (0, 1, 100)] == [0.1, 2 / 11, 0.9]
    # After a restore the update count is read back from the state.
    restored = EMAModel(net, decay=0.9, warmup=True)
    restored.load_state_dict(ema.state_dict())
    restored.update_parameters(net)
    assert int(restored.n_averaged) == 5


def test_timestep_bucket_losses_are_logged_with_the_step_they_belong_to(make_ldm_cfg):
    import csv

    cfg = make_ldm_cfg("ldm_f8", "trainer.max_steps=4", "trainer.log_every_n_steps=1", "data.batch_size=1",
                       "data.samples_per_epoch=8")
    train(cfg)
    rows = [r for r in csv.DictReader(open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv")) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    for row in rows:  # batch of one, logged every step: its bucket holds this step's loss, the others no sample
        buckets = {k: v for k, v in row.items() if k.startswith("train/loss_t")}
        assert len(buckets) == 4 and sorted(buckets.values()).count("nan") == 3
        assert row["train/loss"] in buckets.values()


def test_training_bucket_losses_are_means_over_the_logging_interval(make_ldm_cfg):
    from hydra.utils import instantiate

    stage = instantiate(make_ldm_cfg("ldm_f8").model)
    logged = {}
    stage.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    stage._accumulate_buckets(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0, 10, 999]))
    stage._accumulate_buckets(torch.tensor([3.0]), torch.tensor([260]))
    stage._log_train_buckets()
    assert logged["train/loss_t0-249"] == 1.5 and logged["train/loss_t250-499"] == 3.0
    assert logged["train/loss_t750-999"] == 4.0 and logged["train/loss_t500-749"] != logged["train/loss_t500-749"]
    stage._accumulate_buckets(torch.tensor([5.0]), torch.tensor([0]))  # a new interval starts from zero
    stage._log_train_buckets()
    assert logged["train/loss_t0-249"] == 5.0


def test_validation_bucket_losses_are_the_means_of_their_samples(make_ldm_cfg):
    import lightning as L

    from ldm.training import build

    cfg = make_ldm_cfg("ldm_f8", "data.val_batch_size=5")
    dm, model = build(cfg.data), build(cfg.model)
    dm.prepare_data()
    (metrics,) = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                           enable_model_summary=False).validate(model, datamodule=dm, verbose=False)
    losses, steps = [], []
    with torch.no_grad():
        for i, batch in enumerate(dm.data.val_dataloader()):  # the same fixed draws as validation_step
            per_sample, t = model.loss(batch, generator=torch.Generator().manual_seed(10_000 + i))
            losses.append(per_sample)
            steps.append(t)
    losses, steps = torch.cat(losses), torch.cat(steps)
    assert len(losses) == 16 and i == 3  # 4 batches (5, 5, 5, 1): a mean of per-batch means would differ
    for k in range(4):
        sel = (steps // 250) == k
        key = f"val/loss_t{k * 250}-{k * 250 + 249}"
        if sel.any():
            assert metrics[key] == pytest.approx(losses[sel].mean().item(), rel=1e-5), key
        else:
            assert np.isnan(metrics[key]), key


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_without_the_unused_parameter_search(tmp_path, data_dir, export_dir):
    """The real CLI, 2 gloo processes, find_unused_parameters=False as the stage declares; the trainable text
    tower reads the penultimate layer, so a last block left trainable would make DDP fail on the 2nd step."""
    overrides = [o for o in ldm_overrides(tmp_path, data_dir, export_dir, "ldm_f8")
                 if not o.startswith("paths.output_dir")]
    args = [*overrides, "trainer=ddp", "trainer.devices=2",
           "trainer.max_steps=4", "model.conditioner.embedders.0.layer=penultimate",
           f"hydra.run.dir={tmp_path / 'run'}", f"paths.output_dir={tmp_path / 'run'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = run_script(ROOT / "train.py", *args, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "find_unused_parameters=True was specified" not in out.stderr
    assert "It is recommended to use `self.log('val/" not in out.stderr  # every val metric reduced over ranks
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    assert any(r.get("val/loss") for r in rows)
    assert any(r.get(k) for r in rows for k in r if k.startswith("val/loss_t"))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert (Path(export_dir) / "ldm_f8" / "model.safetensors").is_file()


def test_inpainting_mask_of_another_size_is_refused_and_init_image_errors_name_the_key(trained, tmp_path):
    from PIL import Image

    pipe = LatentDiffusionPipeline.from_pretrained(Path(trained.paths.export_dir) / "ldm_f8")
    Image.new("RGB", (32, 32), "white").save(tmp_path / "in.png")
    Image.new("L", (24, 16), 255).save(tmp_path / "mask.png")
    with pytest.raises(ValueError, match=r"mask is 24x16 but init_image is 32x32"):
        pipe(prompt="a photo of a bag", steps=2, init_image=tmp_path / "in.png", mask=tmp_path / "mask.png")
    (tmp_path / "bad.png").write_text("no image")
    with pytest.raises(ValueError, match=r"init_image=.*bad.png: not an image file PIL can read"):
        pipe(prompt="a photo of a bag", steps=2, init_image=tmp_path / "bad.png")
    Image.new("RGB", (48, 48), "white").save(tmp_path / "big.png")  # another size: resized (and logged)
    assert len(pipe(prompt="a photo of a bag", steps=2, init_image=tmp_path / "big.png", strength=0.5)) == 1


def test_a_prompt_longer_than_the_text_context_warns_on_every_pipeline_call(make_ldm_cfg, caplog):
    from ldm.training import build

    pipe = build(make_ldm_cfg("ldm_f8").model).pipeline()
    long = "a photo of a very long sneaker with white laces and a thick sole"
    with caplog.at_level(logging.WARNING, logger="ldm.conditioning.text"):
        for _ in range(2):
            pipe(prompt=long, negative_prompt="a photo of a bag", steps=1, output_type="tensor")
        pipe(prompt="a photo of a bag", steps=1, output_type="tensor")
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 2 and all("context of 8 tokens" in w for w in warnings), warnings
