"""The first-stage objective of Rombach et al. 2022 (after Esser et al. 2021, "taming transformers").

Generator side:  L = rec + perceptual_weight * LPIPS + kl_weight * KL + lambda * disc_factor * L_G
Discriminator:   hinge loss on PatchGAN logits.

Reconstruction and KL are *summed over pixels / latent dims* and averaged over the batch, as in
the paper, so ``kl_weight ~ 1e-6`` keeps the latent close to the data manifold without blurring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.losses.discriminator import PatchDiscriminator
from ldm.losses.perceptual import PerceptualLoss
from ldm.networks.autoencoder import DiagonalGaussian


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]) (Lim & Ye 2017)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||grad_L nll|| / (||grad_L g|| + 1e-4) at the decoder's last layer L (Esser et al. 2021, eq. 7).

    Balances the adversarial term against reconstruction whatever their scales; detached.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class AutoencoderLoss(nn.Module):
    """L1 (+ LPIPS) reconstruction, KL, and a PatchGAN hinge game switched on at ``disc_start``."""

    def __init__(self, *, discriminator: PatchDiscriminator, kl_weight: float = 1e-6,
                 pixel_weight: float = 1.0, perceptual_weight: float = 0.0,
                 perceptual: PerceptualLoss | None = None, disc_start: int = 50001,
                 disc_weight: float = 0.5, disc_factor: float = 1.0):
        super().__init__()
        for name, value in (("kl_weight", kl_weight), ("pixel_weight", pixel_weight),
                            ("perceptual_weight", perceptual_weight), ("disc_weight", disc_weight),
                            ("disc_factor", disc_factor)):
            if value < 0:
                raise ValueError(f"model.loss.{name}={value}: expected >= 0 (a negative weight rewards the error)")
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual loss module (model.loss.perceptual)")
        self.discriminator = discriminator
        self.perceptual = perceptual if perceptual_weight > 0 else None
        self.kl_weight, self.pixel_weight, self.perceptual_weight = kl_weight, pixel_weight, perceptual_weight
        self.disc_start, self.disc_weight, self.disc_factor = disc_start, disc_weight, disc_factor

    def disc_active(self, step: int) -> bool:
        return self.disc_factor > 0 and step >= self.disc_start

    def reconstruction(self, x: torch.Tensor, xrec: torch.Tensor) -> torch.Tensor:
        """Per-sample reconstruction term summed over pixels (float32 for a stable sum)."""
        rec = self.pixel_weight * (x.float() - xrec.float()).abs()
        per_sample = rec.sum(dim=(1, 2, 3))
        if self.perceptual is not None:
            n_pixels = x[0].numel()
            per_sample = per_sample + self.perceptual_weight * n_pixels * self.perceptual(x, xrec).float()
        return per_sample

    def generator_loss(self, x: torch.Tensor, xrec: torch.Tensor, posterior: DiagonalGaussian, step: int,
                       last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Autoencoder objective; ``last_layer`` enables the adaptive GAN weight (needs grad mode)."""
        nll = self.reconstruction(x, xrec).mean()
        kl = posterior.kl().float().mean()
        loss = nll + self.kl_weight * kl
        logs = {"rec_loss": nll.detach() / x[0].numel(), "kl_loss": kl.detach(), "nll_loss": nll.detach()}
        if self.disc_active(step):
            g_loss = -self.discriminator(xrec).float().mean()
            if last_layer is not None and torch.is_grad_enabled():
                d_weight = adaptive_weight(nll, g_loss, last_layer) * self.disc_weight
            else:  # validation: the configured weight (a CPU scalar: operands, not a copy to the device)
                d_weight = torch.tensor(float(self.disc_weight))
            loss = loss + d_weight * self.disc_factor * g_loss
            logs |= {"g_loss": g_loss.detach(), "d_weight": d_weight}
        logs["total_loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, xrec: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss of the discriminator on real ``x`` and detached reconstructions."""
        logits_real = self.discriminator(x.detach()).float()
        logits_fake = self.discriminator(xrec.detach()).float()
        d_loss = self.disc_factor * hinge_d_loss(logits_real, logits_fake)
        return d_loss, {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(),
                        "logits_fake": logits_fake.detach().mean()}
