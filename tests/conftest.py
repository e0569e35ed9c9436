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

ROOT = Path(__file__).resolve().parents[1]
TINY_RES = 32
TINY_LIMIT = 96
TINY_SHARD = 24

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
