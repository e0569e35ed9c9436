"""``train(cfg)``: build everything a composed Hydra config describes and run ``Trainer.fit``."""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

import ldm.utils.config  # noqa: F401  (registers the resolvers the configs use)
from ldm.callbacks.export import FitClock
from ldm.callbacks.progress import ProgressBar
from ldm.checkpoints import checkpoint_mismatch
from ldm.utils.allocator import apply_policy
from ldm.utils.launch import global_rank, restart_count, shared_run_name
from ldm.utils.lightning_internals import wandb_run_started

log = logging.getLogger(__name__)

# Checkpoints of the manually optimised autoencoder stage hold the weights after the batch's steps,
# which is what resuming needs; Lightning's multi-line warning about it says nothing actionable.
warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")
# Stage 2's frozen first stage (and a frozen text encoder) stay in eval mode on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


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


def check_free_space(folder: str | Path, key: str, min_free_mb: int) -> None:
    """A clear error now rather than a failed checkpoint write hours into the run."""
    free = shutil.disk_usage(folder).free // 2**20
    if free < min_free_mb:
        raise OSError(f"{key}={folder} has {free} MiB free; a run needs at least {min_free_mb} MiB for checkpoints "
                      "and logs (set min_free_mb=... to change the threshold)")


def newest_checkpoint(folder: Path) -> Path | None:
    """The most recently written complete checkpoint under ``folder`` (``*.ckpt``; a save in progress is a
    ``.tmp`` file, so never picked), or None."""
    found = [p for p in folder.glob("**/checkpoints/*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def remove_stale_temp_files(checkpoint_dir: Path) -> None:
    """Delete partial saves a killed run left behind (``.<name>.<pid>.tmp`` of AtomicCheckpointIO)."""
    for tmp in checkpoint_dir.glob(".*.tmp"):
        log.info("removing %s (a save interrupted by a killed run)", tmp)
        tmp.unlink(missing_ok=True)


def resolve_ckpt_path(ckpt_path: str | None, cfg: DictConfig) -> str | None:
    """``last`` -> the newest complete checkpoint of this task's runs (``auto``: the same, or a new run when there is
    none); a run folder -> its newest checkpoint.

    Without ``ckpt_path``, a job whose launcher names its run folder (``slurm-<job id>``, ``torchrun-<rdzv id>``:
    ldm.utils.launch) resumes from that folder's newest checkpoint when it holds one: a requeued or restarted job
    continues by itself, in the same folder."""
    if ckpt_path in (None, ""):
        if shared_run_name() is None:
            return None
        found = newest_checkpoint(Path(cfg.paths.output_dir))
        if found is None:
            return None
        log.info("this job's run folder %s holds a checkpoint (start %d of the job): resuming from it",
                 cfg.paths.output_dir, restart_count() + 1)
        remove_stale_temp_files(found.parent)
        return str(found)
    if ckpt_path in ("last", "auto"):
        runs = Path(cfg.paths.log_dir) / cfg.task_name
        found = newest_checkpoint(runs)
        if found is None and ckpt_path == "auto":
            log.info("ckpt_path=auto: no checkpoint under %s yet, starting a new run", runs)
            return None
        if found is None:
            raise FileNotFoundError(f"ckpt_path=last: no checkpoint under {runs}; train once without ckpt_path (or "
                                    "use ckpt_path=auto: the newest checkpoint if there is one, else a new run)")
    else:
        path = Path(ckpt_path)
        found = newest_checkpoint(path) if path.is_dir() else path
        if found is None or not found.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path}: no checkpoint at {found or path / 'checkpoints'}")
    remove_stale_temp_files(found.parent)
    log.info("resuming from %s", found)
    return str(found)


WANDB_ID_FILE = "wandb_id.txt"


def pin_wandb_run_id(cfg: DictConfig, ckpt_path: str | None) -> None:
    """Give the W&B logger a run id that a resumed run continues.

    The id is written to ``<run folder>/wandb_id.txt``; resuming from a checkpoint in that folder
    reuses it (with ``resume="allow"``), so the curves continue in the same W&B run.
    """
    node = (cfg.get("logger") or {}).get("wandb")
    if not node:
        return
    run_id = node.get("id")
    if run_id is None and ckpt_path is not None:
        saved = Path(ckpt_path).resolve().parent.parent / WANDB_ID_FILE
        if saved.is_file():
            run_id = saved.read_text().strip()
            log.info("continuing W&B run %s (from %s)", run_id, saved)
    if run_id is None:
        run_id = secrets.token_hex(4)  # W&B accepts any short lowercase alphanumeric id
    with open_dict(cfg):
        node.id = run_id
        node.resume = "allow"
    if global_rank() == 0:  # the other ranks' W&B loggers write nothing
        Path(cfg.paths.output_dir, WANDB_ID_FILE).write_text(run_id)


def keep_earlier_metrics(cfg: DictConfig, ckpt_path: str | None) -> None:
    """A run resumed in its own folder (a requeued job) keeps the metrics of its earlier starts: Lightning's CSV
    logger would delete ``csv/metrics.csv`` there, so it is renamed ``csv/metrics_<n>.csv`` (n = 1, 2, ...) first."""
    csv = Path(cfg.paths.output_dir, "csv", "metrics.csv")
    if ckpt_path is None or global_rank() != 0 or not csv.is_file():
        return
    n = 1 + len(list(csv.parent.glob("metrics_*.csv")))
    csv.rename(csv.with_name(f"metrics_{n}.csv"))
    log.info("metrics of the run's earlier start kept as %s", csv.with_name(f"metrics_{n}.csv"))


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
    # First, so that the data, the model and every step allocate under it.
    apply_policy(cfg.get("host_allocator", "default"))
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    check_writable(cfg.paths.output_dir, "paths.output_dir")
    check_free_space(cfg.paths.output_dir, "paths.output_dir", cfg.get("min_free_mb", 200))
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg)
    pin_wandb_run_id(cfg, ckpt_path)
    keep_earlier_metrics(cfg, ckpt_path)
    run_config = OmegaConf.to_container(cfg, resolve=True)

    datamodule = build(cfg.data)
    model = build(cfg.model)
    model.run_config = run_config
    callbacks = _instantiate_dict(cfg.get("callbacks"))
    if cfg.trainer.get("enable_progress_bar") is False:  # Lightning refuses a bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    for callback in callbacks:  # exports are written when training ends: prove now that they can be
        if isinstance(callback, FitClock):
            check_writable(callback.dirpath.parent, "paths.export_dir")
    if not model.automatic_optimization:  # Lightning would refuse these after setting everything up
        if cfg.trainer.get("gradient_clip_val"):
            raise ValueError(f"trainer.gradient_clip_val={cfg.trainer.gradient_clip_val}: the autoencoder stage "
                             f"optimises manually; clip with model.grad_clip={cfg.trainer.gradient_clip_val} instead")
        if (cfg.trainer.get("accumulate_grad_batches") or 1) > 1:
            raise ValueError(f"trainer.accumulate_grad_batches={cfg.trainer.accumulate_grad_batches}: the autoencoder "
                             "stage does not accumulate gradients; raise data.batch_size or trainer.devices instead")
    loggers = _instantiate_dict(cfg.get("logger"))
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in trainer.loggers:
        logger.log_hyperparams(run_config)
    log.info("training %s: precision %s, %d device(s), output in %s", cfg.task_name, trainer.precision,
             trainer.num_devices, cfg.paths.output_dir)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except RuntimeError as err:
        if ckpt_path is not None and "Error(s) in loading state_dict" in str(err):
            raise ValueError(checkpoint_mismatch(ckpt_path, model, run_config)) from err
        raise
    finally:
        # Close W&B runs now (flushing an offline run folder completely), not at interpreter exit, so a
        # later run in this process (a sweep, a resume) starts its own.
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and wandb_run_started(logger):
                logger.experiment.finish(exit_code=0 if trainer.state.status.value == "finished" else 1)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


