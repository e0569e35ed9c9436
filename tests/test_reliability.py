"""Reliability: exact resume, SIGKILL, atomic checkpoints, non-finite losses, unsafe pickles, config
validation, and DDP equivalence with a single process."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm.checkpoint_io import AtomicCheckpointIO
from ldm.checkpoints import read_state_dict
from ldm.pipeline import LatentDiffusionPipeline
from ldm.training import build, train
from tests.conftest import ROOT, tiny_overrides
from tests.script_runner import run_script

CAPTURED: dict = {}


class Probe(L.Callback):
    """Records, when training (re)starts, the state a resume must have restored."""

    def on_train_start(self, trainer, pl_module):
        from ldm.callbacks.ema import averaged_or

        CAPTURED.clear()
        CAPTURED["global_step"] = trainer.global_step
        CAPTURED["optimizers"] = [copy.deepcopy(o.state_dict()) for o in trainer.optimizers]
        CAPTURED["raw"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        CAPTURED["ema"] = {k: v.clone() for k, v in averaged_or(trainer, pl_module).state_dict().items()}


class Poison(L.Callback):
    """Puts NaN into the input of the given batches (by batch index within the epoch)."""

    def __init__(self, batches: list[int]):
        self.batches = set(batches)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx in self.batches:
            key = "image" if "image" in batch else "latent"
            batch[key].fill_(float("nan"))


def _assert_state_equal(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{what}: {k}")


def _assert_optimizer_equal(restored: dict, saved: dict) -> None:
    assert restored["param_groups"][0]["lr"] == saved["param_groups"][0]["lr"]
    for idx, st in saved["state"].items():
        for name, value in st.items():
            torch.testing.assert_close(restored["state"][idx][name], value, rtol=0, atol=0)


PROBE = "+callbacks.probe._target_=tests.test_reliability.Probe"


def _train_then_resume(make, experiment: str, steps: int, more: int, *common: str) -> dict:
    """Train ``steps``, resume to ``steps + more`` with the probe on; returns the first run's last checkpoint."""
    first = make(experiment, f"trainer.max_steps={steps}", *common)
    train(first)
    ckpt = torch.load(Path(first.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    train(make(experiment, f"trainer.max_steps={steps + more}", *common, f"ckpt_path={first.paths.output_dir}", PROBE))
    return ckpt


def test_resume_restores_weights_ema_optimisers_discriminator_and_step(make_cfg):
    ckpt = _train_then_resume(make_cfg, "ae_f8", 8, 4, "callbacks.export_first_stage=null", "model.loss.disc_start=1",
                              "callbacks.model_checkpoint.every_n_train_steps=4")
    assert CAPTURED["global_step"] == ckpt["global_step"] == 8
    assert len(CAPTURED["optimizers"]) == 2  # autoencoder and discriminator
    for restored, saved in zip(CAPTURED["optimizers"], ckpt["optimizer_states"], strict=True):
        _assert_optimizer_equal(restored, saved)
    _assert_state_equal(CAPTURED["raw"], ckpt["current_model_state"], "raw weights")
    assert any(k.startswith("loss.discriminator.") for k in CAPTURED["raw"])
    _assert_state_equal(CAPTURED["ema"], ckpt["state_dict"], "EMA weights")


def test_resume_restores_the_lr_schedule_of_stage_two(make_ldm_cfg):
    ckpt = _train_then_resume(make_ldm_cfg, "ldm_f8", 3, 2, "callbacks.lr_schedule.warmup_steps=10",
                              "data.samples_per_epoch=16", "callbacks.export_pipeline=null")
    assert CAPTURED["global_step"] == 3
    assert [g["base_lr"] for g in CAPTURED["optimizers"][0]["param_groups"]] == \
        [g["base_lr"] for g in ckpt["optimizer_states"][0]["param_groups"]]
    _assert_optimizer_equal(CAPTURED["optimizers"][0], ckpt["optimizer_states"][0])
    _assert_state_equal(CAPTURED["ema"], ckpt["state_dict"], "EMA weights")


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    def dies_halfway(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def _cli(tmp_path: Path, data_dir: Path, run: str, *extra: str) -> list[str]:
    overrides = [o for o in tiny_overrides(tmp_path, data_dir) if not o.startswith("paths.output_dir")]
    return [sys.executable, str(ROOT / "train.py"), "experiment=ae_f8", *overrides,
            f"paths.output_dir={tmp_path}/{run}",
            f"hydra.run.dir={tmp_path}/{run}", "callbacks.export_first_stage=null", "data.samples_per_epoch=100000",
            "callbacks.model_checkpoint.every_n_train_steps=20", *extra]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_reaches_the_final_step(tmp_path, data_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    last = tmp_path / "run1" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(_cli(tmp_path, data_dir, "run1", "trainer.max_steps=2000"), env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)  # let it run on (and possibly be mid-save) past the first checkpoint
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(last, weights_only=True)  # intact: written atomically
    killed_at = saved["global_step"]
    assert 20 <= killed_at < 2000 and killed_at % 20 == 0

    final = 40 + killed_at
    res = run_script(*_cli(tmp_path, data_dir, "run2", f"trainer.max_steps={final}", f"ckpt_path={tmp_path}/run1")[1:],
                     env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = torch.load(tmp_path / "run2" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == final
    rows = (tmp_path / "run2" / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = [int(r.split(",")[header.index("step")]) for r in rows[1:] if r.split(",")[header.index("train/rec_loss")]]
    # Logged steps count batches (the autoencoder stage takes 2 optimiser steps per batch): the resumed run
    # continues from the checkpoint's batch, not from zero.
    assert steps and min(steps) >= killed_at // 2 and max(steps) < final // 2


def test_nonfinite_loss_is_skipped_and_counted(make_cfg):
    cfg = make_cfg("ae_f8", "trainer.max_steps=8", "callbacks.export_first_stage=null",
                   "+callbacks.poison._target_=tests.test_reliability.Poison", "+callbacks.poison.batches=[1]")
    metrics = train(cfg)
    assert metrics["train/nonfinite_skipped"] == 1.0
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    # The skipped autoencoder step is not counted: 5 batches (2 optimiser steps each) less 1 reach max_steps=8.
    assert ckpt["global_step"] == 9
    assert all(torch.isfinite(v).all() for v in ckpt["current_model_state"].values() if v.is_floating_point())


def test_consecutive_nonfinite_losses_stop_training_naming_step_and_part(make_cfg, make_ldm_cfg):
    cfg = make_cfg("ae_f8", "trainer.max_steps=20", "callbacks.export_first_stage=null", "model.max_nonfinite=3",
                   "data.samples_per_epoch=64",
                   "+callbacks.poison._target_=tests.test_reliability.Poison", "+callbacks.poison.batches=[2,3,4,5]")
    with pytest.raises(FloatingPointError, match=r"training stopped at step 7: 3 autoencoder steps in a row had "
                                                 r"non-finite values .*went bad: rec_loss, kl_loss, grad:autoencoder"):
        train(cfg)
    cfg = make_ldm_cfg("ldm_f8", "trainer.max_steps=20", "model.max_nonfinite=2", "data.samples_per_epoch=32",
                       "+callbacks.poison._target_=tests.test_reliability.Poison", "+callbacks.poison.batches=[0,1]")
    with pytest.raises(FloatingPointError, match=r"training stopped at step 0: 2 steps in a row had non-finite values "
                                                 r".*went bad: mse, grad:unet, grad:conditioner"):
        train(cfg)


def test_full_output_disk_fails_before_training(make_cfg, monkeypatch):
    import shutil

    from ldm import training

    cfg = make_cfg("ae_f8", "trainer.max_steps=2")
    usage = shutil.disk_usage(cfg.paths.output_dir if Path(cfg.paths.output_dir).exists() else "/")
    monkeypatch.setattr(training.shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    with pytest.raises(OSError, match=r"paths.output_dir=.* has 10 MiB free; .* needs at least"):
        train(cfg)


def test_pickles_that_would_run_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "ldm_config": Evil()}, path)
    with pytest.raises(ValueError, match=r"refusing weights file .*evil\.ckpt.*could run code"):
        read_state_dict(path)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        LatentDiffusionPipeline.from_pretrained(path)
    with pytest.raises(ValueError, match=r"refusing checkpoint .*evil\.ckpt"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_config_errors_before_the_first_step(make_cfg, make_ldm_cfg, export_dir, tmp_path):
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'"):
        build(make_ldm_cfg("ldm_f8", "model.sampling.sampler=euler").model)
    with pytest.raises(ValueError, match=r"unknown noise schedule 'sigmoid'"):
        build(make_ldm_cfg("ldm_f8", "model.schedule.kind=sigmoid").model)
    with pytest.raises(ValueError, match=r"resolution=36 is not divisible by the downsampling factor f=8"):
        build(make_cfg("ae_f8", "data.resolution=36").model)
    # A latent cache written by one first stage, given to a model on another of the same shape.
    from ldm.checkpoints import FIRST_STAGE, export_folder, load_first_stage
    from ldm.data.fashion_mnist import prepare
    from ldm.latent_cache import prepare_latent_cache

    cfg = make_ldm_cfg("ldm_f8")
    prepare(cfg.data.prepare.image_prepare.out_dir, resolution=32, samples_per_shard=24, limit=96)
    cache = tmp_path / "cache_of_ae_f8"
    prepare_latent_cache(export_dir / "ae_f8", {"train": cfg.data.prepare.splits.train,
                                                "val": cfg.data.prepare.splits.val}, cache, num_workers=0)
    other = load_first_stage(export_dir / "ae_f8")
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(0.1)
    export_folder(tmp_path / "retrained_ae_f8", other, FIRST_STAGE, other.export_config["model"],
                  other.export_config["metadata"])
    cfg = make_ldm_cfg("ldm_f8", "trainer.max_steps=2", "data.prepare=null", f"data.train_shards={cache}/train",
                       f"data.val_shards={cache}/val", f"model.first_stage={tmp_path}/retrained_ae_f8")
    with pytest.raises(ValueError, match=r"the latent cache .*cache_of_ae_f8/train was made by the first stage "
                                         r".*ae_f8 .*not by model.first_stage=.*retrained_ae_f8"):
        train(cfg)


def _ddp_step(rank: int, world: int, init: str, model_state: dict, shards: list[dict], out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    stage = _tiny_stage()
    stage.load_state_dict(model_state)
    unet = stage.unet
    stage.unet = torch.nn.parallel.DistributedDataParallel(unet)  # the stage calls self.unet(...): now DDP's forward
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    loss = _shard_loss(stage, shards[rank], rank).mean()
    loss.backward()  # DDP all-reduces (averages) the gradients of the two shards
    opt.step()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    if rank == 0:
        torch.save({"loss": mean_loss / world, "unet": unet.state_dict()}, out)
    dist.destroy_process_group()


def _tiny_stage():
    from ldm.conditioning.class_embedder import ClassEmbedder
    from ldm.conditioning.conditioner import Conditioner
    from ldm.diffusion.schedule import NoiseSchedule
    from ldm.networks.autoencoder import AutoencoderKL
    from ldm.networks.unet import UNet
    from ldm.stages.latent_diffusion import LatentDiffusionStage

    torch.manual_seed(0)
    ae = AutoencoderKL(ch=8, ch_mult=[1, 2], num_res_blocks=1, resolution=16, z_channels=4, embed_dim=4)
    unet = UNet(in_channels=4, model_channels=16, num_res_blocks=1, channel_mult=[1, 2], attention_resolutions=[2],
                num_head_channels=8, adm_in_channels=16)
    cond = Conditioner([ClassEmbedder(num_classes=10, embed_dim=16)])
    return LatentDiffusionStage(unet=unet, conditioner=cond, first_stage=ae, schedule=NoiseSchedule(),
                                optimizer=torch.optim.AdamW)


def _shard_loss(stage, shard: dict, seed: int) -> torch.Tensor:
    """Per-sample losses of one shard with its own seeds (as each DDP rank draws its own z, t and noise)."""
    torch.manual_seed(200 + seed)  # the posterior sample of the frozen encoder
    return stage.loss(shard, generator=torch.Generator().manual_seed(100 + seed))[0]


@pytest.mark.slow
def test_two_process_ddp_step_equals_one_process_step_on_the_same_global_batch(tmp_path):
    gen = torch.Generator().manual_seed(1)
    batch = {"image": torch.rand(8, 3, 16, 16, generator=gen) * 2 - 1, "class_label": torch.arange(8) % 10}
    shards = [{k: v[i * 4:(i + 1) * 4] for k, v in batch.items()} for i in range(2)]
    stage = _tiny_stage()
    state = copy.deepcopy(stage.state_dict())
    opt = torch.optim.AdamW(stage.unet.parameters(), lr=1e-3)
    losses = [_shard_loss(stage, shards[i], i) for i in range(2)]
    loss = torch.cat(losses).mean()  # the global batch's mean loss
    loss.backward()
    opt.step()
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_step, args=(2, f"file://{tmp_path}/store", state, shards, str(out)), nprocs=2)
    ddp = torch.load(out, weights_only=True)
    torch.testing.assert_close(ddp["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    for k, v in stage.unet.state_dict().items():
        torch.testing.assert_close(ddp["unet"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(ddp["unet"]["out.2.weight"], state["unet.out.2.weight"])  # the step changed weights
