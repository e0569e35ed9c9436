"""Stage 1: train the KL autoencoder against its PatchGAN discriminator (manual optimisation)."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.losses.autoencoder import AutoencoderLoss
from ldm.networks.autoencoder import AutoencoderKL
from ldm.stages.base import OptimizerFactory, Stage
from ldm.stages.guard import NonFiniteGuard
from ldm.stages.init_from import init_from as load_init


class AutoencoderStage(Stage):
    """Alternates an autoencoder step and a discriminator step on every batch.

    Both optimisers step on every batch (the discriminator's is a no-op before ``disc_start``),
    so Lightning's ``global_step`` is always twice the number of batches; ``batch_step`` is the
    batch count that ``disc_start`` refers to.
    """

    # Each backward covers one of two disjoint parameter sets (autoencoder, discriminator): DDP must not
    # expect a gradient for every parameter (read by configs/trainer/ddp.yaml).
    ddp_find_unused_parameters = True
    compiled = ("autoencoder", "loss.discriminator")
    guard_names = ("guard", "disc_guard")

    def __init__(self, *, autoencoder: AutoencoderKL, loss: AutoencoderLoss, optimizer: OptimizerFactory,
                 disc_optimizer: OptimizerFactory, grad_clip: float | None = None, max_nonfinite: int = 5,
                 compile: bool = False, compile_mode: str = "default", init_from: str | None = None):
        super().__init__(compile, compile_mode)
        self.automatic_optimization = False
        self.autoencoder, self.loss = autoencoder, loss
        self.optimizer_factory, self.disc_optimizer_factory = optimizer, disc_optimizer
        self.grad_clip = grad_clip
        self.guard = NonFiniteGuard(max_nonfinite, "autoencoder")
        self.disc_guard = NonFiniteGuard(max_nonfinite, "discriminator")
        if init_from:
            load_init(init_from, {"autoencoder": self.autoencoder})
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)


    @property
    def batch_step(self) -> int:
        return self.global_step // 2

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer_factory(self.autoencoder.parameters()),
                self.disc_optimizer_factory(self.loss.discriminator.parameters())]

    def _step(self, optimizer: Any, loss: torch.Tensor, guard: NonFiniteGuard, parts: dict[str, torch.Tensor],
              group: str, module: torch.nn.Module) -> None:
        """Backward, clip, then an optimiser step that the guard turns into a no-op (on the device) when a
        loss part or a gradient is non-finite."""
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        # Under a GradScaler (16-mixed) gradients are scaled and the scaler skips overflowing steps itself.
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        guard.step(optimizer, parts, [] if scaled else [(group, list(module.parameters()))], self.trainer.world_size)
        optimizer.step()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        opt_ae, opt_d = self.optimizers()
        x = batch["image"]
        step = self.batch_step
        xrec, posterior = self.autoencoder(x)
        g_loss, logs = self.loss.generator_loss(x, xrec, posterior, step,
                                                last_layer=self.autoencoder.decoder.last_layer)
        parts = {k: logs[k] for k in ("rec_loss", "kl_loss", "g_loss", "d_weight") if k in logs}
        self._step(opt_ae, g_loss, self.guard, parts, "autoencoder", self.autoencoder)
        if self.loss.disc_active(step):
            d_loss, d_logs = self.loss.discriminator_loss(x, xrec)
            self._step(opt_d, d_loss, self.disc_guard, {"d_loss": d_loss.detach()}, "discriminator",
                       self.loss.discriminator)
            logs |= d_logs
        else:
            opt_d.zero_grad(set_to_none=True)
            opt_d.step()  # no gradients: a no-op that keeps global_step = 2 x batches
        skipped = [g.skipped_tensor for g in (self.guard, self.disc_guard) if g.skipped_tensor is not None]
        logs["nonfinite_skipped"] = torch.stack(skipped).sum()
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False, batch_size=x.shape[0])
        self.log("train/rec", logs["rec_loss"], prog_bar=True, logger=False, batch_size=x.shape[0])
        return g_loss.detach()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        xrec, posterior = self.autoencoder(x, sample_posterior=False)
        _, logs = self.loss.generator_loss(x, xrec, posterior, self.batch_step)
        target, pred = (x.float() + 1) / 2, ((xrec.float() + 1) / 2).clamp(0, 1)
        self.val_psnr.update(pred, target)
        self.val_ssim.update(pred, target)
        self.log_dict({"val/rec_loss": logs["rec_loss"], "val/kl_loss": logs["kl_loss"]}, sync_dist=True,
                      batch_size=x.shape[0])
        self.log_dict({"val/psnr": self.val_psnr, "val/ssim": self.val_ssim}, prog_bar=True,
                      batch_size=x.shape[0])

    @torch.no_grad()
    def log_images(self, batch: dict, max_images: int = 8) -> dict[str, torch.Tensor]:
        """Inputs and their (posterior-mode) reconstructions, in [-1, 1], for the image logger."""
        x = batch["image"][:max_images].to(self.device)
        xrec, _ = self.autoencoder(x, sample_posterior=False)
        return {"inputs": x, "reconstructions": xrec.clamp(-1, 1)}
