"""Zero-terminal SNR end to end: the ``ldm_f8_zsnr`` variant (v-prediction, abar_T = 0, trailing spacing) trains,
samples finitely, and its samples pass the same class-accuracy check as the default ``ldm_f8``."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.levels import make_levels
from ldm.diffusion.samplers import sample
from ldm.pipeline import LatentDiffusionPipeline
from ldm.training import build, train

CLASSES = 10


def _class_latents(shape: tuple[int, ...]) -> torch.Tensor:
    """One fixed latent pattern per class: data whose class a nearest-mean rule reads off a sample exactly."""
    return torch.randn(CLASSES, *shape, generator=torch.Generator().manual_seed(0)) * 0.8


def _trained_accuracy(cfg, steps: int = 200, sampler: str = "dpmpp_2m") -> tuple[float, torch.Tensor]:
    """Train the config's stage-2 module on the class latents (class-conditional), sample 5 per class with CFG 2,
    and return the nearest-class-mean accuracy and the samples."""
    torch.manual_seed(0)
    stage = build(cfg.model)
    shape = stage.first_stage.latent_shape(stage.first_stage.resolution)
    means = _class_latents(shape)
    params = list(stage.unet.parameters()) + stage.conditioner.trainable_parameters()
    opt = torch.optim.Adam(params, lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    stage.train()
    for _ in range(steps):
        labels = torch.randint(0, CLASSES, (64,), generator=gen)
        z0 = means[labels] + 0.05 * torch.randn(64, *shape, generator=gen)
        t = torch.randint(0, stage.schedule.num_timesteps, (64,), generator=gen)
        cond = stage.conditioner({"class_label": labels})
        loss = stage.denoising_loss(z0, t, torch.randn(z0.shape, generator=gen), cond["context"], cond["y"]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    stage.eval()
    pipe: LatentDiffusionPipeline = stage.pipeline()
    labels = torch.arange(CLASSES).repeat_interleave(5)
    with torch.no_grad():
        den = Denoiser(pipe.model_fn, pipe.prediction, pipe.schedule, pipe.conditioner({"class_label": labels}),
                       pipe.conditioner.uncond(len(labels)), 2.0)
        x = torch.randn(len(labels), *shape, generator=torch.Generator().manual_seed(2))
        z = sample(sampler, den, x, make_levels(pipe.schedule, 20, pipe.spacing))
    nearest = torch.cdist(z.flatten(1), means.flatten(1)).argmin(1)
    return (nearest == labels).float().mean().item(), z


@pytest.mark.slow
def test_zero_terminal_snr_variant_learns_the_classes_like_the_default(make_ldm_cfg):
    """The check: nearest-class-mean accuracy of 50 guided samples after 200 steps, >= 60% (chance: 10%).
    Measured: default 76% after 200 steps (AMD Zen 5; 72% after 150; Xeon AVX-512: 78% after 300, 84% after 600),
    zero-terminal-SNR variant 100%: the default's sampler starts from pure noise at abar_T = 0.0047, where training
    always left some signal."""
    accuracies = {}
    for experiment in ("ldm_f8", "ldm_f8_zsnr"):
        cfg = make_ldm_cfg(experiment, "model/conditioner=class")
        acc, z = _trained_accuracy(cfg)
        assert torch.isfinite(z).all(), experiment
        accuracies[experiment] = acc
    zsnr = make_ldm_cfg("ldm_f8_zsnr").model
    assert (zsnr.prediction, zsnr.schedule.zero_terminal_snr, zsnr.spacing) == ("v", True, "trailing")
    assert accuracies["ldm_f8"] >= 0.6 and accuracies["ldm_f8_zsnr"] >= 0.6, accuracies
    assert accuracies["ldm_f8_zsnr"] >= accuracies["ldm_f8"] - 0.1, accuracies


def test_zero_terminal_snr_variant_trains_and_samples_finitely_through_train_py(make_ldm_cfg, tmp_path):
    cfg = make_ldm_cfg("ldm_f8_zsnr", "trainer.max_steps=3", "data.samples_per_epoch=8")
    train(cfg)
    pipe = LatentDiffusionPipeline.from_pretrained(f"{cfg.paths.export_dir}/ldm_f8_zsnr")
    assert pipe.prediction == "v" and float(pipe.schedule.alphas_cumprod[-1]) == 0.0
    for sampler in ("ddim", "ddpm", "dpmpp_2m", "euler_a", "dpmpp_2m_karras"):
        images = pipe(prompt=["a photo of a bag"], sampler=sampler, steps=3, output_type="tensor")
        assert torch.isfinite(images).all(), sampler


def test_eps_prediction_on_a_zero_terminal_snr_schedule_is_refused_at_construction(make_ldm_cfg):
    with pytest.raises(ValueError, match="prediction=eps with a zero-terminal-SNR schedule"):
        build(make_ldm_cfg("ldm_f8_zsnr", "model.prediction=eps").model)
