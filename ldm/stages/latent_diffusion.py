"""Stage 2: a conditional U-Net learns to denoise the frozen first stage's latents (eps/v MSE)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics.aggregation import MeanMetric

from ldm.checkpoints import load_first_stage
from ldm.conditioning.conditioner import Conditioner
from ldm.diffusion.denoiser import check_prediction_for
from ldm.diffusion.guidance import check_interval, check_rescale
from ldm.diffusion.levels import make_levels
from ldm.diffusion.objectives import diffusion_loss, min_snr_weight, training_target
from ldm.diffusion.samplers import check_sampler
from ldm.diffusion.schedule import NoiseSchedule
from ldm.networks.autoencoder import AutoencoderKL
from ldm.networks.unet import UNet
from ldm.pipeline import LatentDiffusionPipeline
from ldm.stages.base import OptimizerFactory, Stage
from ldm.stages.guard import NonFiniteGuard, is_logging_step
from ldm.stages.init_from import init_from as load_init

log = logging.getLogger(__name__)


def _without_first_stage(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "first_stage.")]:
        del state_dict[key]


def _with_own_first_stage(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """A state dict without first-stage weights loads strictly: the module's own (from its export) fill the gap."""
    for key, value in module.first_stage.state_dict(prefix=prefix + "first_stage.").items():
        state_dict.setdefault(key, value)


class LatentDiffusionStage(Stage):
    """Noise-prediction training on latents of an exported, frozen first stage.

    The first stage is a frozen submodule (no gradients, always in eval mode, not in the optimiser);
    latents are normalised with the statistics measured at its export. ``first_stage`` is the export
    folder (or an ``AutoencoderKL`` already loaded).
    """

    # Every trainable parameter (U-Net, trainable embedders) gets a gradient in every backward: DDP need
    # not search for unused ones (read by configs/trainer/ddp.yaml).
    ddp_find_unused_parameters = False
    compiled = ("unet",)
    guard_names = ("guard",)

    def __init__(self, *, unet: UNet, conditioner: Conditioner, first_stage: str | AutoencoderKL,
                 schedule: NoiseSchedule, optimizer: OptimizerFactory, prediction: str = "eps",
                 min_snr_gamma: float | None = None, latent_norm: str = "channel",
                 timestep_buckets: int = 4, sampling: dict[str, Any] | None = None, spacing: str = "trailing",
                 max_nonfinite: int = 5, compile: bool = False, compile_mode: str = "default",
                 noise_offset: float = 0.0, init_from: str | None = None):
        super().__init__(compile, compile_mode)
        ae = load_first_stage(first_stage) if isinstance(first_stage, str | Path) else first_stage
        ae.eval().requires_grad_(False)
        where = first_stage if isinstance(first_stage, str | Path) else "the given first stage"
        if unet.in_channels != ae.embed_dim or unet.out_channels != ae.embed_dim:
            raise ValueError(f"model.unet.in_channels={unet.in_channels} / out_channels={unet.out_channels} but "
                             f"{where} has embed_dim={ae.embed_dim} latent channels; they must be equal")
        if unet.context_dim != conditioner.context_dim:
            raise ValueError(f"model.unet.context_dim={unet.context_dim} but the conditioner's context width is "
                             f"{conditioner.context_dim}; they must be equal")
        if unet.adm_in_channels != conditioner.adm_dim:
            raise ValueError(f"model.unet.adm_in_channels={unet.adm_in_channels} but the conditioner's vector (y) "
                             f"width is {conditioner.adm_dim}; they must be equal")
        side = ae.resolution // ae.downsampling_factor
        if side % unet.downsampling:
            raise ValueError(f"latent side {side} (resolution {ae.resolution} / f={ae.downsampling_factor}) is not "
                             f"divisible by the U-Net's downsampling {unet.downsampling} (channel_mult)")
        if not 1 <= timestep_buckets <= schedule.num_timesteps:
            raise ValueError(f"model.timestep_buckets={timestep_buckets}: expected 1 to the schedule's "
                             f"{schedule.num_timesteps} timesteps")
        # A frozen submodule: moved with the stage and in eval mode, never in the optimiser, and not part of the
        # trained state (checkpoints hold U-Net + conditioner; the first stage comes from its export).
        self.first_stage = ae
        self.register_state_dict_post_hook(_without_first_stage)
        self.register_load_state_dict_pre_hook(_with_own_first_stage)
        if not noise_offset >= 0:
            raise ValueError(f"model.noise_offset={noise_offset}: expected >= 0 (0: off; 0.05-0.1 usual)")
        self.noise_offset = noise_offset
        sampling = dict(sampling or {})
        check_sampler(sampling.get("sampler", "dpmpp_2m"))  # unknown names fail here, not after training
        check_interval(sampling.get("guidance_interval"), "model.sampling.guidance_interval")
        check_rescale(sampling.get("guidance_rescale", 0.0), "model.sampling.guidance_rescale")
        make_levels(schedule, 2, spacing)
        self.unet, self.conditioner, self.schedule = unet, conditioner, schedule
        if init_from:  # fine-tuning: start from pretrained weights (a resumed run's checkpoint overrides them)
            load_init(init_from, {"unet": unet, "conditioner": conditioner})
        self.prediction = check_prediction_for(prediction, schedule)
        self.min_snr_gamma = min_snr_gamma
        self.latent_norm = latent_norm
        self.optimizer_factory = optimizer
        self.timestep_buckets = timestep_buckets
        # Validation loss per timestep bucket (a bucket without samples on any rank logs NaN).
        self.val_bucket_loss = nn.ModuleList(MeanMetric() for _ in range(timestep_buckets))
        self.sampling = sampling
        self.spacing = spacing
        self.guard = NonFiniteGuard(max_nonfinite)
        self._loss_parts: dict[str, torch.Tensor] = {}
        # Training loss per timestep bucket, summed on the device over a logging interval: (sum, count) rows.
        self._train_buckets: torch.Tensor | None = None


    def train(self, mode: bool = True) -> LatentDiffusionStage:
        super().train(mode)
        self.first_stage.eval()  # frozen: always in inference mode
        return self

    def pipeline(self) -> LatentDiffusionPipeline:
        """A sampling pipeline over this module's current weights."""
        pipe = LatentDiffusionPipeline(self.unet, self.conditioner, self.first_stage, self.schedule,
                                       prediction=self.prediction, latent_norm=self.latent_norm, spacing=self.spacing)
        if self.run_config is not None:
            pipe.config = self.run_config["model"]
        return pipe

    @torch.no_grad()
    def latents(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised z ~ q(z|x): from cached posterior (mean, std) when present, else by encoding images; drawn
        with ``generator`` (a seeded CPU one in validation) when given."""
        if "latent" in batch:
            mean, std = batch["latent"].float().chunk(2, dim=1)
            noise = torch.randn_like(std) if generator is None else torch.randn(std.shape, generator=generator).to(std)
            z = mean + std * noise
        else:
            posterior = self.first_stage.encode(batch["image"])
            z = posterior.sample() if generator is None else posterior.mean + posterior.std * torch.randn(
                posterior.std.shape, generator=generator).to(posterior.std)
        return self.first_stage.normalize_latents(z.float(), self.latent_norm)

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample weighted loss and the timesteps drawn, t ~ U{0..T-1}."""
        z0 = self.latents(batch, generator)
        b = z0.shape[0]
        cond = self.conditioner(batch)
        if generator is None:  # drawn on the device: no host round trip inside the training step
            t = torch.randint(0, self.schedule.num_timesteps, (b,), device=z0.device)
            noise = torch.randn_like(z0)
            if self.noise_offset:  # a per-channel constant shift: lets the model change an image's mean brightness
                noise = noise + self.noise_offset * torch.randn(b, z0.shape[1], 1, 1, device=z0.device)
        else:  # a seeded CPU generator (validation): the same draws on every device type
            t = torch.randint(0, self.schedule.num_timesteps, (b,), generator=generator).to(z0.device)
            noise = torch.randn(z0.shape, generator=generator).to(z0.device)
        return self.denoising_loss(z0, t, noise, cond["context"], cond["y"]), t

    def denoising_loss(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, context: torch.Tensor | None,
                       y: torch.Tensor | None) -> torch.Tensor:
        """Per-sample weighted MSE between the U-Net's output at z_t = q_sample(z0, t, noise) and its target:
        the stage's tensor program, one graph for torch.compile (tests pin zero graph breaks)."""
        x_t = self.schedule.q_sample(z0, t, noise)
        out = self.unet(x_t, t, context=context, y=y)
        alpha, sigma = self.schedule.alpha_sigma(t, z0)
        target = training_target(self.prediction, z0, noise, alpha, sigma)
        weight = min_snr_weight(self.schedule.snr(t), self.min_snr_gamma, self.prediction)
        return diffusion_loss(out, target, weight)

    def _bucket_names(self) -> list[str]:
        """The timestep buckets' names (``loss_t0-249`` ...)."""
        edges = self.schedule.num_timesteps // self.timestep_buckets
        return [f"loss_t{k * edges}-{(k + 1) * edges - 1}" for k in range(self.timestep_buckets)]

    def _bucket_of(self, t: torch.Tensor) -> torch.Tensor:
        """Each timestep's bucket index."""
        return (t // (self.schedule.num_timesteps // self.timestep_buckets)).clamp(max=self.timestep_buckets - 1)

    def _accumulate_buckets(self, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        """Add this batch's per-sample losses to their timestep buckets' (sum, count), on the device."""
        bucket = self._bucket_of(t)
        rows = torch.stack([per_sample.float(), torch.ones_like(per_sample, dtype=torch.float32)])
        if self._train_buckets is None or self._train_buckets.device != rows.device:
            self._train_buckets = rows.new_zeros(2, self.timestep_buckets)
        self._train_buckets.index_add_(1, bucket, rows)

    def _log_train_buckets(self) -> None:
        """Mean loss per bucket over the interval since the last logging step (NaN: no sample in the bucket)."""
        sums, counts = self._train_buckets
        means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.nan)
        for k, name in enumerate(self._bucket_names()):
            self.log(f"train/{name}", means[k], batch_size=1)
        self._train_buckets.zero_()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        per_sample, t = self.loss(batch)
        loss = per_sample.mean()
        # Checked with the gradients right before the optimiser step (on_before_optimizer_step): a non-finite
        # loss or gradient skips that step on the device, with no host read here.
        self._loss_parts = {"mse": loss.detach()}
        self.log("train/loss", loss, prog_bar=True, batch_size=len(t))
        self._accumulate_buckets(per_sample.detach(), t)
        if is_logging_step(self._trainer):
            self._log_train_buckets()
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Under a GradScaler (16-mixed) gradients are scaled and the scaler skips overflowing steps itself.
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        groups = [] if scaled else [("unet", list(self.unet.parameters())),
                                    ("conditioner", self.conditioner.trainable_parameters())]
        self.guard.step(optimizer, self._loss_parts, groups, self.trainer.world_size)
        self.log("train/nonfinite_skipped", self.guard.skipped_tensor, batch_size=1)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Fixed latent draws, noise and timesteps per batch index: validation losses are comparable across epochs,
        # and validation leaves the training RNG streams where they were.
        gen = torch.Generator().manual_seed(10_000 + batch_idx)
        per_sample, t = self.loss(batch, generator=gen)
        self.log("val/loss", per_sample.mean(), sync_dist=True, batch_size=len(t))
        # Per timestep bucket: torchmetrics accumulates on the device; Lightning reduces over ranks and logs at
        # the epoch's end (every rank logs every bucket, so the reduction is the same collective everywhere).
        bucket = self._bucket_of(t)
        for k, (name, metric) in enumerate(zip(self._bucket_names(), self.val_bucket_loss, strict=True)):
            metric.update(per_sample.detach(), (bucket == k).to(per_sample.dtype))
            self.log(f"val/{name}", metric)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The learning rate over the run (warm-up, decay) is set by callbacks.lr_schedule.
        return self.optimizer_factory(list(self.unet.parameters()) + self.conditioner.trainable_parameters())

    @torch.no_grad()
    def log_images(self, batch: dict, max_images: int = 10) -> dict[str, torch.Tensor]:
        """Samples for the fixed prompts/class labels and seed of ``sampling`` (for the image logger)."""
        s = self.sampling
        was_training = self.training
        self.eval()
        keys = self.conditioner.input_keys  # each model gets the condition it was trained on
        images = self.pipeline()(prompt=s.get("prompts") if "caption" in keys else None,
                                 class_labels=s.get("class_labels") if "class_label" in keys else None,
                                 num_images=s.get("num_images", 1), sampler=s.get("sampler", "dpmpp_2m"),
                                 steps=s.get("steps", 20), cfg_scale=s.get("cfg_scale", 4.0), seed=s.get("seed", 0),
                                 guidance_interval=s.get("guidance_interval"),
                                 guidance_rescale=s.get("guidance_rescale", 0.0), output_type="tensor")
        self.train(was_training)
        return {"samples": images[:max_images]}
