"""Export the trained first stage when training ends, with latent statistics measured over all ranks."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ldm.callbacks.ema import averaged_or
from ldm.checkpoints import FIRST_STAGE, GUIDE, export_folder
from ldm.posthoc_ema import gamma_of, reconstruct

log = logging.getLogger(__name__)


class LatentMoments:
    """Running per-channel sums of z, z^2 and the count, for mean/std that can be summed across ranks."""

    def __init__(self, channels: int, device: torch.device):
        self.sums = torch.zeros(3, channels, dtype=torch.float64, device=device)

    def update(self, z: torch.Tensor) -> None:
        z = z.double().transpose(0, 1).flatten(1)  # C x (B*H*W)
        self.sums[0] += z.sum(1)
        self.sums[1] += z.pow(2).sum(1)
        self.sums[2] += z.shape[1]

    def finalize(self, sums: torch.Tensor) -> dict:
        """Per-channel mean/std and the global std (over all channels), from all-reduced sums."""
        s, s2, n = sums
        mean = s / n
        var = (s2 / n - mean.pow(2)).clamp_min(0)
        global_mean = s.sum() / n.sum()
        global_var = s2.sum() / n.sum() - global_mean**2
        return {"mean": mean.tolist(), "std": var.sqrt().tolist(), "global_mean": float(global_mean),
                "global_std": float(global_var.clamp_min(0).sqrt()), "values_per_channel": int(n[0].item())}


class FitClock(L.Callback):
    """Counts the training images this rank sees and the wall time of fit, for the export's metadata."""

    def __init__(self):
        self._start = 0.0
        self._images = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._images += len(batch["image"] if "image" in batch else batch["latent"])

    def fit_metadata(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """``fit_images`` (over all ranks), ``fit_seconds``, ``global_step``, ``world_size`` (all ranks call)."""
        seconds = time.perf_counter() - self._start
        images = int(trainer.strategy.reduce(torch.tensor(float(self._images), device=pl_module.device),
                                             reduce_op="sum").item())
        return {"global_step": trainer.global_step, "world_size": trainer.world_size, "fit_images": images,
                "fit_seconds": round(seconds, 1)}

    def export_keeping_the_run(self, trainer: L.Trainer, write: Callable[[], None]) -> None:
        """Run ``write`` (rank 0's export); if it fails, first make sure the trained state is on disk as a
        checkpoint, then stop with an error saying where it is and how to export it again."""
        try:
            write()
        except Exception as err:
            ckpt = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath),
                        None)
            path = Path(ckpt.dirpath if ckpt is not None else trainer.default_root_dir) / "last.ckpt"
            trainer.save_checkpoint(path)
            raise RuntimeError(
                f"export to {self.dirpath} failed ({type(err).__name__}: {err}). Nothing is lost: the trained state "
                f"is in {path}. Export it again by resuming from it (training ends at once, then exports): "
                f"python train.py <the same overrides> ckpt_path={path} paths.export_dir=<a writable folder>"
            ) from err


class ExportFirstStage(FitClock):
    """On ``on_train_end``: measure latent statistics of posterior samples on ``stats_batches``
    training batches per rank, sum them over ranks, and export the autoencoder (rank 0) to ``dirpath``.
    With the EMA callback on, the averaged weights are measured and exported.
    """

    def __init__(self, dirpath: str, stats_batches: int = 50):
        super().__init__()
        self.dirpath = Path(dirpath)
        self.stats_batches = stats_batches

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        ae = pl_module.autoencoder
        moments = LatentMoments(ae.embed_dim, pl_module.device)
        was_training = ae.training
        ae.eval()
        gen = torch.Generator(device=pl_module.device).manual_seed(trainer.global_rank)
        loader = trainer.datamodule.train_dataloader()
        for batch in itertools.islice(loader, self.stats_batches):
            moments.update(ae.encode(batch["image"].to(pl_module.device)).sample(gen))
        ae.train(was_training)
        sums = trainer.strategy.reduce(moments.sums, reduce_op="sum")
        return moments.finalize(sums)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            log.info("fast_dev_run: first stage not exported (as Lightning skips checkpoints)")
            return
        fit = self.fit_metadata(trainer, pl_module)
        source = averaged_or(trainer, pl_module)
        stats = self.measure(trainer, source)
        ae = source.autoencoder
        ae.latent_mean.copy_(torch.tensor(stats["mean"], dtype=ae.latent_mean.dtype))
        ae.latent_std.copy_(torch.tensor(stats["std"], dtype=ae.latent_std.dtype))
        if trainer.is_global_zero:
            run_config = pl_module.run_config or {}
            model_config = run_config.get("model", {}).get("autoencoder")
            if model_config is None:
                raise RuntimeError("ExportFirstStage needs the module's run_config['model']['autoencoder'] "
                                   "(set by ldm.training.train) to write a rebuildable config.yaml")
            metadata = {"downsampling_factor": ae.downsampling_factor, "embed_dim": ae.embed_dim,
                        "resolution": ae.resolution, "latent_stats": stats} | fit
            self.export_keeping_the_run(
                trainer, lambda: export_folder(self.dirpath, ae, FIRST_STAGE, model_config, metadata, run_config))
            log.info("first stage (f=%d, %d latent channels) exported to %s; latent std per channel %s",
                     ae.downsampling_factor, ae.embed_dim, self.dirpath,
                     [round(s, 3) for s in stats["std"]])
        trainer.strategy.barrier("export_first_stage")


class ExportPipeline(FitClock):
    """On ``on_train_end``: export the latent diffusion model (EMA weights when the EMA callback is on)
    with a copy of its first stage to ``dirpath`` — one folder ``LatentDiffusionPipeline`` and sample.py load.

    ``posthoc_sigma_rel``: export instead the post-hoc EMA of that width (Karras et al. 2024), reconstructed from
    the snapshots of ``callbacks.posthoc_ema`` (which must be on).

    ``guide_of``: this run trains autoguidance's guide for the model exported at that folder (experiment=ldm_f8_guide)
    and exports into its ``guide/`` (instead of ``dirpath``), where sample.py and the pipeline find it. Checked before
    the first step: the model must exist and read the same latents (first stage, normalisation, noise schedule,
    condition); a model exported later to that folder replaces the folder, guide and all."""

    def __init__(self, dirpath: str, posthoc_sigma_rel: float | None = None, guide_of: str | None = None):
        super().__init__()
        self.guide_of = Path(guide_of) if guide_of else None
        self.dirpath = self.guide_of / GUIDE if self.guide_of is not None else Path(dirpath)
        if posthoc_sigma_rel is not None:
            gamma_of(posthoc_sigma_rel)  # a width out of range fails here, not after training
        self.posthoc_sigma_rel = posthoc_sigma_rel

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.guide_of is None or trainer.fast_dev_run:
            return
        from ldm.pipeline import LatentDiffusionPipeline

        key = f"callbacks.export_pipeline.guide_of={self.guide_of}"
        try:
            model = LatentDiffusionPipeline.from_pretrained(self.guide_of, device=pl_module.device, guide=None)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"{key}: {err} (the guide is exported into that model's folder: train the model "
                             "first)") from None
        model.set_guide(pl_module.pipeline(), f"{key} (the guide this run trains)")  # raises on other latents
        model.set_guide(None)

    def _posthoc_pipeline(self, trainer: L.Trainer, pl_module: L.LightningModule):
        """The pipeline over the module with its trained weights replaced by the post-hoc EMA of the set width, and
        a function that puts the raw weights back (the pipeline shares the module's networks)."""
        from ldm.callbacks.posthoc_ema import PostHocEMA

        callback = next((c for c in trainer.callbacks if isinstance(c, PostHocEMA)), None)
        if callback is None:
            raise ValueError(f"callbacks.export_pipeline.posthoc_sigma_rel={self.posthoc_sigma_rel} needs "
                             "callbacks.posthoc_ema (its snapshots)")
        callback.flush(trainer)
        weights, info = reconstruct(callback.dirpath, self.posthoc_sigma_rel)
        pipe = pl_module.pipeline()
        state = {**{f"unet.{k}": v for k, v in pipe.unet.state_dict().items()},
                 **{f"conditioner.{k}": v for k, v in pipe.conditioner.state_dict().items()}}
        raw = {name: state[name].detach().clone() for name in weights}
        with torch.no_grad():
            for name, value in weights.items():
                state[name].copy_(value.to(state[name].device, state[name].dtype))
        log.info("post-hoc EMA sigma_rel %g at step %d from %d snapshots (profile matched to %.2f%%)",
                 info["sigma_rel"], info["step"], info["snapshots"], 100 * info["profile_error"])

        @torch.no_grad()
        def restore() -> None:
            for name, value in raw.items():
                state[name].copy_(value)

        return pipe, info, restore

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            log.info("fast_dev_run: latent diffusion model not exported")
            return
        fit = self.fit_metadata(trainer, pl_module)
        if trainer.is_global_zero:
            restore = None
            if self.posthoc_sigma_rel is not None:
                pipe, info, restore = self._posthoc_pipeline(trainer, pl_module)
                fit = fit | {"posthoc_ema": json.dumps(info)}
                what = f"post-hoc EMA sigma_rel {self.posthoc_sigma_rel:g}"
            else:
                source = averaged_or(trainer, pl_module)
                pipe = source.pipeline()
                what = "EMA" if source is not pl_module else "raw"
            pipe.config = (pl_module.run_config or {}).get("model", pipe.config)
            try:
                self.export_keeping_the_run(
                    trainer, lambda: pipe.save_pretrained(self.dirpath, pl_module.run_config, metadata=fit))
            finally:
                if restore is not None:
                    restore()
            log.info("latent diffusion model (%s weights) exported to %s", what, self.dirpath)
        trainer.strategy.barrier("export_pipeline")
