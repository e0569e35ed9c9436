"""Nothing is silently lost, poisoned or hijacked: loaded artifacts run no code, damaged files are named, outputs
never collide, caches cannot be swapped underneath a run, data is complete or loudly not, resume is exact."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoints import CONFIG, WEIGHTS, check_targets, load_first_stage, read_state_dict
from ldm.pipeline import LatentDiffusionPipeline
from ldm.stages.latent_diffusion import LatentDiffusionStage
from ldm.training import build
from tests.conftest import assert_same_training_state


def test_a_crafted_export_config_cannot_write_files(export_dir, tmp_path):
    folder = tmp_path / "ae_f8"
    shutil.copytree(export_dir / "ae_f8", folder)
    victim = tmp_path / "copied"
    cfg = OmegaConf.load(folder / CONFIG)
    cfg.model = {"_target_": "shutil.copyfile", "src": str(folder / CONFIG), "dst": str(victim)}
    OmegaConf.save(cfg, folder / CONFIG)
    with pytest.raises(ValueError, match=rf"{folder / CONFIG}: refusing to build 'shutil.copyfile' \(at the top"):
        load_first_stage(folder)
    assert not victim.exists()


def test_a_crafted_checkpoint_config_cannot_open_files(make_ldm_cfg, tmp_path):
    victim = tmp_path / "created_by_the_checkpoint"
    model_cfg = OmegaConf.to_container(make_ldm_cfg("ldm_f8").model, resolve=True)
    model_cfg["schedule"] = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "ldm_config": {"model": model_cfg}}, path)  # loads with weights_only=True
    with pytest.raises(ValueError, match=r"crafted\.ckpt: refusing to build 'builtins.open'"):
        LatentDiffusionPipeline.from_pretrained(path)
    assert not victim.exists()


def test_trusted_targets_are_framework_classes_only():
    check_targets({"_target_": "ldm.networks.unet.UNet", "x": [{"_target_": "ldm.conditioning.ClassEmbedder"}]}, "f")
    for target in ("ldm.latent_cache.prepare_latent_cache", "ldm.networks.unet.timestep_embedding", "os.system",
                   "ldm.networks.nonexistent.Thing"):
        with pytest.raises(ValueError, match=rf"f: refusing to build '{target}' \(at a\[0\]\._target_\)"):
            check_targets({"a": [{"_target_": target}]}, "f")


def test_the_framework_own_exports_still_load(make_ldm_cfg, export_dir, tmp_path):
    stage = build(make_ldm_cfg("ldm_f8").model)
    pipe = stage.pipeline()
    pipe.config = OmegaConf.to_container(make_ldm_cfg("ldm_f8").model, resolve=True)
    pipe.save_pretrained(tmp_path / "ldm")
    assert LatentDiffusionPipeline.from_pretrained(tmp_path / "ldm").unet is not None


@pytest.mark.parametrize("damage", ["truncated", "huge header"])
def test_damaged_safetensors_name_the_file(export_dir, tmp_path, damage):
    folder = tmp_path / "ae_f8"
    shutil.copytree(export_dir / "ae_f8", folder)
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[:len(data) // 2] if damage == "truncated" else (2**40).to_bytes(8, "little")
                                   + data[8:])
    with pytest.raises(ValueError, match=rf"{folder / WEIGHTS} is not a readable safetensors file"):
        load_first_stage(folder)
    with pytest.raises(ValueError, match=rf"{folder / WEIGHTS} is not a readable safetensors file"):
        read_state_dict(folder / WEIGHTS)


def test_an_export_folder_that_cannot_be_written_fails_before_training(make_cfg, tmp_path):
    from ldm.training import train

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = make_cfg("ae_f8", "trainer.max_steps=2", f"paths.export_dir={blocker}")
    with pytest.raises(OSError, match=r"paths.export_dir=.*a_file is not writable"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before any training


def test_a_failed_export_keeps_the_trained_state_and_says_how_to_export_again(make_cfg, monkeypatch):
    from ldm.callbacks import export
    from ldm.training import train

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "export_folder", broken)
    cfg = make_cfg("ae_f8", "trainer.max_steps=4", "callbacks.model_checkpoint.every_n_train_steps=1000")
    with pytest.raises(RuntimeError, match=r"export to .*ae_f8 failed \(OSError.*No space left.*the trained state is "
                                           r"in .*last\.ckpt.*ckpt_path="):
        train(cfg)
    ckpt = torch.load(f"{cfg.paths.output_dir}/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4


def test_processes_started_together_get_their_own_run_folders():
    import subprocess
    import sys

    code = "from ldm.utils.config import run_token; print(run_token(), run_token())"
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
            for _ in range(2)]
    assert outs[0][0] == outs[0][1] and outs[1][0] == outs[1][1]  # one token per process
    assert outs[0][0] != outs[1][0]
    from tests.conftest import ROOT

    assert "${ldm.run_token:}" in (ROOT / "configs/hydra/default.yaml").read_text()


def test_resume_picks_the_newest_complete_checkpoint_and_clears_stale_temp_files(tmp_path):
    import os

    from ldm.training import resolve_ckpt_path

    runs = tmp_path / "logs" / "ae_f8" / "runs"
    old, new = runs / "a" / "checkpoints", runs / "b" / "checkpoints"
    for folder in (old, new):
        folder.mkdir(parents=True)
    (old / "last.ckpt").write_bytes(b"old")
    (new / "step0000040.ckpt").write_bytes(b"newer")
    (new / ".last.ckpt.12345.tmp").write_bytes(b"half a save")
    os.utime(old / "last.ckpt", ns=(1_000_000_000, 1_000_000_000))
    cfg = OmegaConf.create({"paths": {"log_dir": str(tmp_path / "logs")}, "task_name": "ae_f8"})
    assert resolve_ckpt_path("last", cfg) == str(new / "step0000040.ckpt")
    assert not (new / ".last.ckpt.12345.tmp").exists()
    assert resolve_ckpt_path(str(runs / "a"), cfg) == str(old / "last.ckpt")
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=.*nowhere: no checkpoint"):
        resolve_ckpt_path(str(tmp_path / "nowhere"), cfg)


def test_the_same_seed_gives_the_same_first_losses_in_both_stages(make_cfg, make_ldm_cfg, tmp_path):
    import csv

    from ldm.training import train

    for make, experiment, column, export in ((make_cfg, "ae_f8", "train/rec_loss", "export_first_stage"),
                                             (make_ldm_cfg, "ldm_f8", "train/loss", "export_pipeline")):
        losses = []
        for run in ("one", "two"):
            cfg = make(experiment, "trainer.max_steps=6", "seed=7", f"paths.output_dir={tmp_path}/{experiment}_{run}",
                       f"callbacks.{export}=null", "data.shuffle_buffer=48")
            train(cfg)
            rows = csv.DictReader(open(f"{cfg.paths.output_dir}/csv/metrics.csv"))
            losses.append([r[column] for r in rows if r.get(column)])
        assert len(losses[0]) >= 3 and losses[0] == losses[1], experiment


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA-transparent", "RGBA", "I;16", "RGB", "CMYK"])
def test_images_of_every_common_mode_decode_to_the_right_rgb(mode, tmp_path):
    """A mid-grey square with a transparent (where the mode has alpha) or black left half, saved as PNG (CMYK as
    JPEG), decodes to grey on the right and white (transparent) or black on the left."""
    import io

    import numpy as np
    from PIL import Image

    from ldm.data.decode import ImageTransform

    size, grey = 16, 128
    left_transparent = mode in ("LA", "PA-transparent", "RGBA")
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[:, size // 2:] = (grey, grey, grey, 255)
    rgba[:, :size // 2, 3] = 0 if left_transparent else 255
    base = Image.fromarray(rgba, "RGBA")
    if mode == "I;16":  # a 16-bit greyscale PNG
        image = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)
    elif mode == "PA-transparent":
        image = base.convert("P")
        image.info["transparency"] = image.getpixel((0, 0))
    elif mode == "1":
        image = base.convert("L").point(lambda v: 255 if v > 64 else 0).convert("1")
        grey = 255
    else:
        image = base if mode == "RGBA" else base.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if mode == "CMYK" else "PNG", **({"quality": 100} if mode == "CMYK" else {}))
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        im.load()
        x = ImageTransform(size)(im, None)
    pixels = ((x + 1) * 127.5).round()
    right, left = pixels[:, :, size // 2 + 2:].mean().item(), pixels[:, :, :size // 2 - 2].mean().item()
    assert abs(right - grey) <= 3, (mode, right)
    assert abs(left - (255 if left_transparent else 0)) <= 3, (mode, left)


def test_a_later_run_keeps_the_earlier_runs_export_beside_its_own(make_cfg, tmp_path):
    from ldm.training import train

    exports = tmp_path / "exports"
    runs = []
    for name in ("run_a", "run_b"):
        cfg = make_cfg("ae_f8", "trainer.max_steps=2", f"paths.output_dir={tmp_path}/{name}",
                       f"paths.export_dir={exports}")
        train(cfg)
        runs.append(cfg.paths.output_dir)
    assert OmegaConf.load(exports / "ae_f8" / CONFIG).run_config.paths.output_dir == runs[1]
    kept = exports / "ae_f8@run_a"
    assert OmegaConf.load(kept / CONFIG).run_config.paths.output_dir == runs[0]
    assert load_first_stage(kept) is not None and load_first_stage(exports / "ae_f8") is not None


def test_a_cache_rebuilt_while_a_run_reads_it_stops_the_reader(make_ldm_cfg, export_dir):
    from pathlib import Path

    from ldm.data.fashion_mnist import prepare
    from ldm.data.loaders import ShardData
    from ldm.data.manifest import CacheReplacedError
    from ldm.latent_cache import prepare_latent_cache

    cfg = make_ldm_cfg("ldm_f8")
    prep = cfg.data.prepare
    prepare(prep.image_prepare.out_dir, resolution=32, samples_per_shard=24, limit=96)
    out = Path(prep.out_dir).parent / "swapped"
    splits = {"val": prep.splits.val}
    prepare_latent_cache(export_dir / "ae_f8", splits, out, num_workers=0, samples_per_shard=24)
    assert len(list((out / "val").glob("*.tar"))) == 4 and not list(out.parent.glob(".swapped.building-*"))
    data = ShardData(train_shards=str(out / "val"), val_shards=str(out / "val"), kind="latent", val_batch_size=8,
                     num_workers=0, required_keys=("caption", "class_label"))
    batches = iter(data.val_dataloader())
    assert next(batches)["latent"].shape[1] == 8  # ae_f8: mean and std of 4 channels
    prepare_latent_cache(export_dir / "ae_f4", splits, out, num_workers=0, samples_per_shard=24)  # another run
    with pytest.raises(CacheReplacedError, match=r"swapped was rebuilt while this run was reading it"):
        for _ in batches:
            pass


def test_shards_shorter_than_recorded_or_empty_are_warned_about_and_counted(tmp_path, caplog):
    import tarfile

    from ldm.data.loaders import ShardData
    from ldm.data.shards import write_records

    records = [{"__key__": f"s{i:03d}", "txt": f"caption {i}", "cls": str(i % 10),
                "latent.npy": _npy(torch.zeros(8, 4, 4))} for i in range(30)]
    shards = write_records(records, tmp_path, "val", samples_per_shard=10)
    assert [p.name for p in shards] == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    members = tarfile.open(shards[0]).getmembers()
    cut = next(m for m in members if m.name.startswith("s009"))  # the last sample's first member
    shards[0].write_bytes(shards[0].read_bytes()[:cut.offset] + b"\0" * 1024)  # a tail cut at a member boundary
    shards[1].write_bytes(b"")  # emptied
    data = ShardData(train_shards=str(tmp_path), val_shards=str(tmp_path), kind="latent", val_batch_size=64,
                     num_workers=0, required_keys=("caption", "class_label"))
    seen = sum(len(b["latent"]) for b in data.val_dataloader())
    assert seen == 9 + 0 + 10
    assert data.skipped()["val_skipped"] == 2
    assert "val-000000.tar" in caplog.text and "val-000001.tar" in caplog.text and "recorded 10" in caplog.text


def _npy(t: torch.Tensor) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, t.numpy().astype(np.float16), allow_pickle=False)
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("validation", ["+trainer.limit_val_batches=0", "data.val_limit=8"])
def test_a_killed_and_resumed_run_matches_an_unbroken_one(make_ldm_cfg, tmp_path, validation):
    """Resumed from the checkpoints an unbroken run wrote at an epoch boundary (4 batches per epoch) and mid-epoch
    (what a killed run leaves): weights, EMA and its count, optimiser and LR state equal the unbroken run's at its
    end (RNG states and the data position come from the checkpoint)."""
    from ldm.training import train

    common = ["trainer.max_steps=10", "data.samples_per_epoch=16", "data.shuffle_buffer=48",
              "callbacks.export_pipeline=null", "callbacks.image_logger=null", validation,
              "model.conditioner.embedders.0.ucg_rate=0.3"]

    def run(name: str, *extra: str) -> dict:
        train(make_ldm_cfg("ldm_f8", f"paths.output_dir={tmp_path}/{name}", *common, *extra))
        return torch.load(f"{tmp_path}/{name}/checkpoints/last.ckpt", weights_only=True)

    unbroken = run("unbroken", "callbacks.model_checkpoint.every_n_train_steps=2",
                   "callbacks.model_checkpoint.save_top_k=-1")
    for stop_at in (4, 6):
        resumed = run(f"resumed_{stop_at}", f"ckpt_path={tmp_path}/unbroken/checkpoints/step{stop_at:07d}.ckpt")
        assert unbroken["global_step"] == 10
        assert_same_training_state(resumed, unbroken, f"stop at {stop_at}")


class KeyedDraws(LatentDiffusionStage):
    """Stage 2 whose latent draw, timestep and noise are functions of each sample's key (not of the batch it lands
    in), so that a batch of 4 and four accumulated batches of 1 see the same draws."""

    def loss(self, batch: dict, generator: torch.Generator | None = None):
        if generator is not None:
            return super().loss(batch, generator)
        gens = [torch.Generator().manual_seed(int.from_bytes(key.encode()[-6:], "big")) for key in batch["key"]]
        mean, std = batch["latent"].float().chunk(2, dim=1)
        z0 = self.first_stage.normalize_latents(mean + std * torch.stack(
            [torch.randn(s.shape, generator=g) for s, g in zip(std, gens, strict=True)]), self.latent_norm)
        t = torch.stack([torch.randint(0, self.schedule.num_timesteps, (), generator=g) for g in gens])
        noise = torch.stack([torch.randn(z.shape, generator=g) for z, g in zip(z0, gens, strict=True)])
        cond = self.conditioner(batch)
        return self.denoising_loss(z0, t, noise, cond["context"], cond["y"]), t


def test_batch_1_with_4_accumulated_matches_batch_4(make_ldm_cfg, tmp_path):
    from ldm.training import train

    states = {}
    for name, batch, accumulate in (("b4", 4, 1), ("b1x4", 1, 4)):
        cfg = make_ldm_cfg("ldm_f8", "model._target_=tests.test_trust.KeyedDraws", f"data.batch_size={batch}",
                           f"trainer.accumulate_grad_batches={accumulate}", "trainer.max_steps=3",
                           "data.samples_per_epoch=48", "model.conditioner.embedders.0.ucg_rate=0.0",
                           "callbacks.lr_schedule=null", "callbacks.export_pipeline=null",
                           "callbacks.image_logger=null", "+trainer.limit_val_batches=0",
                           f"paths.output_dir={tmp_path}/{name}")
        train(cfg)
        states[name] = torch.load(f"{tmp_path}/{name}/checkpoints/last.ckpt", weights_only=True)
    a, b = states["b4"], states["b1x4"]
    assert a["global_step"] == b["global_step"] == 3
    # Equal up to float summation order (Adam divides tiny gradients by their own scale; 1e-5 is ~3% of one
    # step's move at lr 3e-4).
    for key in ("current_model_state", "state_dict"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, k=key, n=name: f"{k} {n}: {m}")
    assert int(a["averaging_state"]["n_averaged"]) == int(b["averaging_state"]["n_averaged"])


class BreakWeights(L.Callback):
    """After the given step, overflows one weight to inf (what a huge but finite update can do)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("inf")


def test_no_checkpoint_is_written_from_non_finite_weights(make_cfg, tmp_path):
    from ldm.training import train

    cfg = make_cfg("ae_f8", "trainer.max_steps=20", "callbacks.model_checkpoint.every_n_train_steps=4",
                   "+callbacks.break._target_=tests.test_trust.BreakWeights", "+callbacks.break.step=6",
                   "callbacks.export_first_stage=null")
    with pytest.raises(FloatingPointError, match=r"step 8: 1 weight tensors hold NaN/inf .*no checkpoint was written"):
        train(cfg)
    kept = torch.load(f"{cfg.paths.output_dir}/checkpoints/step0000004.ckpt", weights_only=True)
    assert kept["global_step"] == 4 and all(torch.isfinite(v).all() for v in kept["state_dict"].values()
                                            if v.is_floating_point())
    assert not list(Path(cfg.paths.output_dir, "checkpoints").glob("*0008*"))
