"""Autoencoder losses: reconstruction, perceptual, KL, PatchGAN with adaptive weight."""

from ldm.losses.autoencoder import AutoencoderLoss, adaptive_weight, hinge_d_loss
from ldm.losses.discriminator import PatchDiscriminator
from ldm.losses.perceptual import PerceptualLoss

__all__ = ["AutoencoderLoss", "PatchDiscriminator", "PerceptualLoss", "adaptive_weight", "hinge_d_loss"]
