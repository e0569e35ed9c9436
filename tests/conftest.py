"""Shared fixtures: a tiny built-in dataset and the real Hydra configs, shrunk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import ldm.utils.config  # noqa: F401
from ldm.data.fashion_mnist import prepare
from tests.synthetic_data import imagenet_layout  # noqa: F401 (a fixture, for every test file)

ROOT = Path(__file__).resolve().parents[1]
TINY_RES = 32
TINY_LIMIT = 96
TINY_SHARD = 24

# The cores shared among the parallel workers (pytest-xdist, `-n`): one worker per core gets one thread, and so
# do the processes its tests start (OMP_NUM_THREADS), so that the workers do not fight over the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(_THREADS)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fashion-MNIST at 32 px, 96 samples per split, 4 shards each (as the tiny configs expect)."""
    root = tmp_path_factory.mktemp("data")
    prepare(root / f"fashion_mnist_{TINY_RES}", resolution=TINY_RES, samples_per_shard=TINY_SHARD,
            limit=TINY_LIMIT)
    return root


def tiny_overrides(root: Path, data_dir: Path) -> list[str]:
    return [
        f"paths.root_dir={root}", f"paths.output_dir={root}/run", f"paths.data_dir={data_dir}",
        f"data.resolution={TINY_RES}", "data.batch_size=4", "data.val_batch_size=8", "data.num_workers=0",
        "data.val_limit=16", "data.samples_per_epoch=16", "data.shuffle_buffer=8",
        f"data.prepare.samples_per_shard={TINY_SHARD}", f"+data.prepare.limit={TINY_LIMIT}",
        "model.autoencoder.ch=8", "model.loss.discriminator.ch=8", "model.loss.discriminator.n_layers=2",
        "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.max_time=null",
        "trainer.log_every_n_steps=1", "logger=csv",
    ]


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.hydra = None
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path, data_dir: Path):
    """``make_cfg(experiment, *extra_overrides)`` -> a composed, tiny config writing under tmp_path."""

    def _make(experiment: str | None = None, *extra: str) -> DictConfig:
        overrides = ([f"experiment={experiment}"] if experiment else []) + tiny_overrides(tmp_path, data_dir)
        return compose_cfg(overrides + list(extra))

    return _make


FIRST_STAGES = {"ae_f4": ((1, 2, 4), 3), "ae_f8": ((1, 2, 4, 4), 4), "ae_f16": ((1, 2, 4, 4, 4), 16)}


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random-weight first stages for f = 4, 8, 16 at 32 px, exported as train.py would."""
    from ldm.checkpoints import FIRST_STAGE, export_folder
    from ldm.networks.autoencoder import AutoencoderKL

    root = tmp_path_factory.mktemp("exports")
    for i, (name, (ch_mult, z)) in enumerate(FIRST_STAGES.items()):
        torch.manual_seed(i)
        cfg = {"_target_": "ldm.networks.autoencoder.AutoencoderKL", "ch": 8, "ch_mult": list(ch_mult),
               "num_res_blocks": 1, "resolution": TINY_RES, "z_channels": z, "embed_dim": z}
        ae = AutoencoderKL(**{k: v for k, v in cfg.items() if k != "_target_"})
        ae.latent_std.fill_(0.5)
        export_folder(root / name, ae, FIRST_STAGE, cfg, {"downsampling_factor": ae.downsampling_factor})
    return root


def tiny_ldm_overrides(export_dir: Path) -> list[str]:
    return [
        f"paths.export_dir={export_dir}", "data.batch_size=4", "data.prepare.batch_size=32",
        f"data.prepare.samples_per_shard={TINY_SHARD}",
        f"+data.prepare.image_prepare.limit={TINY_LIMIT}", f"data.prepare.image_prepare.samples_per_shard={TINY_SHARD}",
        "model.unet.model_channels=16", "model.unet.num_head_channels=8",
        "model.conditioner.embedders.0.arch.width=16", "model.conditioner.embedders.0.arch.layers=1",
        "model.conditioner.embedders.0.arch.heads=2", "model.conditioner.embedders.0.arch.context_length=8",
        "model.conditioner.embedders.0.embed_dim=16", "callbacks.lr_schedule.warmup_steps=2",
        "model.sampling.steps=2", "model.sampling.prompts=[a photo of a bag,a photo of a coat]",
    ]


def ldm_overrides(root: Path, data_dir: Path, export_dir: Path, experiment: str = "ldm_f8", *extra: str) -> list[str]:
    """The overrides of a tiny stage-2 run writing under ``root`` (for compose_cfg or the train.py CLI)."""
    overrides = [f"experiment={experiment}"] + tiny_overrides(root, data_dir)
    overrides = [o for o in overrides if not o.startswith(("model.autoencoder", "model.loss", "+data.prepare.limit",
                                                           "data.prepare.samples_per_shard", "data.batch_size"))]
    ldm = tiny_ldm_overrides(export_dir)
    if "model/conditioner=class" in extra:  # no text tower to shrink
        ldm = [o for o in ldm if not o.startswith("model.conditioner.embedders.0.arch")]
    return overrides + ldm + list(extra)


@pytest.fixture
def make_ldm_cfg(tmp_path: Path, data_dir: Path, export_dir: Path):
    """``make_ldm_cfg(experiment, *extra)``: a tiny stage-2 config over the tiny first stages."""

    def _make(experiment: str = "ldm_f8", *extra: str) -> DictConfig:
        return compose_cfg(ldm_overrides(tmp_path, data_dir, export_dir, experiment, *extra))

    return _make


def assert_same_training_state(resumed: dict, unbroken: dict, what: str = "") -> None:
    """Two stage-2 checkpoints hold the same training state: raw and EMA weights, the EMA's count, the optimiser's
    moments, and the learning-rate schedule's state (the optimiser's lr and the base it scales: the schedule is
    callbacks.lr_schedule, not a Lightning scheduler)."""
    assert resumed["global_step"] == unbroken["global_step"], what
    for key in ("current_model_state", "state_dict"):  # raw weights, EMA weights
        for name, value in unbroken[key].items():
            torch.testing.assert_close(resumed[key][name], value, msg=f"{what}: {key} {name}")
    assert int(resumed["averaging_state"]["n_averaged"]) == int(unbroken["averaging_state"]["n_averaged"]), what
    (opt_a,), (opt_b,) = unbroken["optimizer_states"], resumed["optimizer_states"]
    for idx, state in opt_a["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(opt_b["state"][idx][name], value, msg=f"{what}: optimiser {idx} {name}")
    for key in ("lr", "base_lr"):
        assert opt_b["param_groups"][0][key] == pytest.approx(opt_a["param_groups"][0][key]), f"{what}: {key}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longer tests (marked slow) first: with parallel workers they start early instead of running alone at
    the end (the order within each group is kept)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
