"""Stage 1 end to end through the real composed configs (tiny): every experiment, export, bf16, DDP, resume."""

import csv
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoints import load_first_stage
from ldm.training import train
from tests.conftest import ROOT, tiny_overrides
from tests.script_runner import run_script

EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("ae_*.yaml"))


def test_every_autoencoder_experiment_is_found():
    assert {"ae_f4", "ae_f8", "ae_f16"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run_every_experiment(make_cfg, experiment):
    cfg = make_cfg(experiment, "debug=fdr")
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/psnr"]))
    ch_mult = cfg.model.autoencoder.ch_mult
    assert cfg.model.autoencoder.embed_dim == {"ae_f4": 3, "ae_f8": 4, "ae_f16": 16}.get(experiment,
                                                                                         cfg.model.autoencoder.embed_dim)
    assert 2 ** (len(ch_mult) - 1) == int(experiment.split("_f")[-1])


def test_export_then_reload_gives_identical_outputs(make_cfg, tmp_path):
    cfg = make_cfg("ae_f8", "trainer.max_steps=10", "callbacks.export_first_stage.stats_batches=3",
                   "model.loss.disc_start=1")
    metrics = train(cfg)
    assert "train/d_loss" in metrics  # the discriminator was switched on at batch 1
    export = Path(cfg.paths.export_dir) / "ae_f8"
    assert (export / "model.safetensors").is_file() and (export / "config.yaml").is_file()
    meta = OmegaConf.load(export / "config.yaml").metadata
    assert meta.downsampling_factor == 8 and meta.embed_dim == 4 and len(meta.latent_stats.std) == 4
    assert all(s > 0 for s in meta.latent_stats.std)
    ae = load_first_stage(export)
    torch.testing.assert_close(ae.latent_std, torch.tensor(list(meta.latent_stats.std), dtype=torch.float32))
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["ldm_config"]["model"]["autoencoder"]["ch_mult"] == [1, 2, 4, 4]
    ae2 = load_first_stage(export / "model.safetensors")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ae.decode(ae.encode(x).mode()), ae2.decode(ae2.encode(x).mode()), rtol=0,
                                   atol=0)
        state = {k[len("autoencoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("autoencoder.")}
        for k, v in ae.state_dict().items():
            if k not in ("latent_mean", "latent_std"):
                torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    csv = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text()
    assert "train/rec_loss" in csv and "val/psnr" in csv and "train/kl_loss" in csv
    assert list((Path(cfg.paths.output_dir) / "images").glob("val_reconstructions_*.png"))


def test_missing_export_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python train.py experiment=ae_f8"):
        load_first_stage(tmp_path / "nothing")


def test_bf16_mixed_on_cpu(make_cfg):
    cfg = make_cfg("ae_f8", "trainer.precision=bf16-mixed", "trainer.max_steps=4",
                   "callbacks.export_first_stage=null")
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/rec_loss"]))


def test_resume_from_last_checkpoint(make_cfg):
    first = make_cfg("ae_f8", "trainer.max_steps=4", "callbacks.export_first_stage=null",
                     "callbacks.model_checkpoint.every_n_train_steps=2")
    train(first)
    resumed = make_cfg("ae_f8", "trainer.max_steps=8", "callbacks.export_first_stage=null",
                       f"ckpt_path={first.paths.output_dir}")
    train(resumed)
    ckpt = torch.load(Path(first.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 8


def test_last_checkpoint_holds_the_step_a_run_ends_on_between_periodic_saves(make_cfg):
    """max_steps=10 with a checkpoint every 4 steps: last.ckpt is the state at step 10 (Lightning alone leaves it at
    step 8, and a longer run continued from it would repeat steps 9 and 10)."""
    cfg = make_cfg("ae_f8", "trainer.max_steps=10", "callbacks.model_checkpoint.every_n_train_steps=4",
                   "callbacks.export_first_stage=null")
    train(cfg)
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 10
    assert sorted(p.name for p in folder.glob("step*.ckpt")) == ["step0000008.ckpt"]


def test_unwritable_output_dir_fails_before_training(make_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = make_cfg("ae_f8", f"paths.output_dir={blocker}/run")
    with pytest.raises(OSError, match="paths.output_dir=.* is not writable"):
        train(cfg)


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tmp_path, data_dir):
    """The real CLI, 2 gloo processes: trains, validates and exports with statistics from both ranks."""
    overrides = [o for o in tiny_overrides(tmp_path, data_dir) if not o.startswith("paths.output_dir")]
    args = ["experiment=ae_f8", "trainer=ddp", "trainer.devices=2",
           "trainer.max_steps=6", "model.loss.disc_start=1", "callbacks.export_first_stage.stats_batches=2",
           "hydra.run.dir=" + str(
               tmp_path / "run"), *overrides, "paths.output_dir=" + str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = run_script(ROOT / "train.py", *args, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    meta = OmegaConf.load(tmp_path / "exports" / "ae_f8" / "config.yaml").metadata
    assert meta.world_size == 2
    # 2 ranks x 2 batches x 4 images x 4x4 latent positions
    assert meta.latent_stats.values_per_channel == 2 * 2 * 4 * 16





def test_cluster_configs_compose_and_build(make_cfg):
    from ldm.training import build

    cfg = make_cfg("ae_f8", "trainer=fsdp")
    policy = build(cfg.trainer.strategy.auto_wrap_policy)
    from ldm.networks.attention import SpatialTransformer
    from ldm.networks.unet import ResBlock

    assert policy == {ResBlock, SpatialTransformer}
    from hydra import compose, initialize_config_dir

    from tests.conftest import compose_cfg

    assert compose_cfg(["trainer=ddp_bf16"]).trainer.precision == "bf16-mixed"

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        slurm = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                        return_hydra_config=True)
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher") and slurm.hydra.launcher.tasks_per_node == 8


def test_compile_option_compiles_the_network_in_place(make_cfg, monkeypatch):
    from ldm.losses.discriminator import PatchDiscriminator
    from ldm.networks.autoencoder import AutoencoderKL

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self)))
    train(make_cfg("ae_f8", "model.compile=true", "debug=fdr"))
    assert compiled == [AutoencoderKL, PatchDiscriminator]


def test_data_workers_default_to_the_cores_the_compute_leaves_free(monkeypatch):
    from ldm.utils import config
    from tests.conftest import compose_cfg

    monkeypatch.setattr(config, "usable_cpus", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert compose_cfg(["trainer.accelerator=cpu"]).data.num_workers == 0  # 2 cores, 2 compute threads
    assert compose_cfg(["trainer.accelerator=cpu", "data.num_workers=3"]).data.num_workers == 3
    monkeypatch.setattr(config, "usable_cpus", lambda: 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 12)
    assert config.auto_num_workers("cpu") == 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert config.auto_num_workers("auto") == 1  # 16 cores over 8 GPUs, one per process kept
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert config.auto_num_workers("gpu") == 8 and config.auto_num_workers("cpu") == 4


def test_ddp_searches_for_unused_parameters_only_where_the_stage_needs_it(make_cfg, make_ldm_cfg):
    # The autoencoder stage's two backward passes cover disjoint parameter sets; latent diffusion uses all.
    assert make_cfg("ae_f8", "trainer=ddp").trainer.strategy.find_unused_parameters is True
    assert make_ldm_cfg("ldm_f8", "trainer=ddp").trainer.strategy.find_unused_parameters is False
    assert make_ldm_cfg("ldm_f8", "trainer=ddp_bf16").trainer.strategy.find_unused_parameters is False
    forced = make_ldm_cfg("ldm_f8", "trainer=ddp", "trainer.strategy.find_unused_parameters=true")
    assert forced.trainer.strategy.find_unused_parameters is True


def test_debug_overfit_drives_the_loss_of_one_replayed_batch_down(make_ldm_cfg):
    """Fresh noise and timesteps every step keep a diffusion loss noisy; its mean over the last 20 steps must
    still fall below the first 20's (measured on the tiny model: 0.92 -> 0.71)."""
    cfg = make_ldm_cfg("ldm_f8", "debug=overfit", "trainer.max_steps=150", "callbacks.export_pipeline=null",
                       "model.optimizer.lr=3e-3", "trainer.log_every_n_steps=1")
    train(cfg)
    rows = [r for r in csv.DictReader(open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv")) if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.85 * first, (first, last)


def test_replayed_batches_are_the_first_ones_every_epoch():
    from ldm.stages.data import ReplayBatches

    source = iter([{"i": k} for k in range(100)])
    replay = ReplayBatches(source, 2, 5)
    assert [b["i"] for b in replay] == [0, 1, 0, 1, 0] and [b["i"] for b in replay] == [0, 1, 0, 1, 0]


@pytest.mark.parametrize("debug", ["limit", "profiler"])
def test_debug_configs_run(make_cfg, debug):
    cfg = make_cfg("ae_f8", f"debug={debug}", "trainer.max_steps=4", "callbacks.export_first_stage=null")
    train(cfg)
    if debug == "profiler":
        assert "Action" in (Path(cfg.paths.output_dir) / "fit-profile.txt").read_text()


def test_checkpoints_keep_the_newest_n(make_cfg):
    cfg = make_cfg("ae_f8", "trainer.max_steps=12", "callbacks.model_checkpoint.every_n_train_steps=2",
                   "callbacks.model_checkpoint.save_top_k=2", "callbacks.export_first_stage=null")
    train(cfg)
    kept = sorted(p.name for p in (Path(cfg.paths.output_dir) / "checkpoints").glob("step*.ckpt"))
    assert kept == ["step0000010.ckpt", "step0000012.ckpt"], kept
