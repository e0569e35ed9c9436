"""``train(cfg)``: build everything a composed Hydra config describes and run ``Trainer.fit``."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import ldm.utils.config  # noqa: F401  (registers the resolvers the configs use)

log = logging.getLogger(__name__)

# Checkpoints of the manually optimised autoencoder stage hold the weights after the batch's steps,
# which is what resuming needs; Lightning's multi-line warning about it says nothing actionable.
warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")


def check_writable(folder: str | Path, key: str) -> Path:
    """Create ``folder`` and prove it takes a file, before any training time is spent."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test"):
            pass
    except OSError as err:
        raise OSError(f"{key}={folder} is not writable ({err.strerror}); choose another with {key}=...") from err
    return folder


def resolve_ckpt_path(ckpt_path: str | None, cfg: DictConfig) -> str | None:
    """``last`` -> newest ``last.ckpt`` of this task's runs; a run folder -> its ``checkpoints/last.ckpt``."""
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        runs = Path(cfg.paths.log_dir) / cfg.task_name
        found = sorted(runs.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"ckpt_path=last: no last.ckpt under {runs}; train once without ckpt_path")
        log.info("resuming from %s", found[-1])
        return str(found[-1])
    path = Path(ckpt_path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no checkpoint at {path}")
    return str(path)


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that surfaces our own errors (missing export, shape mismatch...)
    as themselves rather than wrapped in Hydra's InstantiationException."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, FileNotFoundError | ValueError | TypeError | KeyError | OSError):
            raise cause from err
        raise


def _instantiate_dict(node: DictConfig | None) -> list[Any]:
    """Callbacks and loggers are dicts keyed by name; a null entry switches one off."""
    if not node:
        return []
    return [build(v) for v in node.values() if v is not None and "_target_" in v]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model; returns the final callback metrics as floats."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    check_writable(cfg.paths.output_dir, "paths.output_dir")
    run_config = OmegaConf.to_container(cfg, resolve=True)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg)

    datamodule = build(cfg.data)
    model = build(cfg.model)
    model.run_config = run_config
    callbacks = _instantiate_dict(cfg.get("callbacks"))
    loggers = _instantiate_dict(cfg.get("logger"))
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in trainer.loggers:
        logger.log_hyperparams(run_config)
    log.info("training %s: precision %s, %d device(s), output in %s", cfg.task_name, trainer.precision,
             trainer.num_devices, cfg.paths.output_dir)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


