"""Autoencoder losses on hand-made tensors."""

import pytest
import torch

from ldm.losses import AutoencoderLoss, PatchDiscriminator, adaptive_weight, hinge_d_loss
from ldm.losses.perceptual import VGG16_FILE, PerceptualLoss, vgg16_cache_path
from ldm.networks.autoencoder import DiagonalGaussian


def test_hinge_loss_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0])   # relu(1 - r) = 0, 0.5, 2  -> mean 2.5/3
    fake = torch.tensor([-2.0, 0.0, 1.0])   # relu(1 + f) = 0, 1, 2    -> mean 1
    expected = 0.5 * (2.5 / 3 + 1.0)
    assert hinge_d_loss(real, fake).item() == pytest.approx(expected)
    assert hinge_d_loss(torch.full((4,), 5.0), torch.full((4,), -5.0)).item() == 0.0


def test_adaptive_weight_is_ratio_of_gradient_norms():
    w = torch.nn.Parameter(torch.ones(4))
    a = torch.tensor([3.0, 0.0, 4.0, 0.0])    # grad of nll = a, |a| = 5
    b = torch.tensor([0.0, 1.0, 0.0, 0.0])    # grad of g = b, |b| = 1
    weight = adaptive_weight((w * a).sum(), (w * b).sum(), w)
    assert weight.item() == pytest.approx(5.0 / (1.0 + 1e-4))
    assert not weight.requires_grad
    assert adaptive_weight((w * a).sum(), (w * b).sum() * 0, w).item() == pytest.approx(1e4)  # clamped


def _loss(disc_start: int) -> AutoencoderLoss:
    return AutoencoderLoss(discriminator=PatchDiscriminator(ch=8, n_layers=2), kl_weight=0.5,
                           disc_start=disc_start, disc_weight=0.5)


def test_generator_loss_is_summed_l1_plus_weighted_kl_before_disc_start():
    loss = _loss(disc_start=10)
    x = torch.zeros(2, 3, 8, 8)
    xrec = torch.full_like(x, 0.25)
    post = DiagonalGaussian(torch.cat([torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)], 1))  # KL = 0.5*4 = 2
    total, logs = loss.generator_loss(x, xrec, post, step=9)
    assert logs["nll_loss"].item() == pytest.approx(0.25 * 3 * 64)
    assert logs["kl_loss"].item() == pytest.approx(2.0)
    assert total.item() == pytest.approx(0.25 * 3 * 64 + 0.5 * 2.0)
    assert "g_loss" not in logs and not loss.disc_active(9) and loss.disc_active(10)


def test_generator_loss_adds_adaptive_gan_term_after_disc_start():
    torch.manual_seed(0)
    loss = _loss(disc_start=0)
    last = torch.nn.Parameter(torch.randn(3, 3, 1, 1))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    xrec = torch.nn.functional.conv2d(x, last)
    post = DiagonalGaussian(torch.zeros(2, 2, 2, 2))
    total, logs = loss.generator_loss(x, xrec, post, step=0, last_layer=last)
    expected = logs["nll_loss"] + 0.5 * logs["kl_loss"] + logs["d_weight"] * logs["g_loss"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["d_weight"].item() > 0
    d_loss, d_logs = loss.discriminator_loss(x, xrec)
    assert d_loss.item() >= 0 and d_loss.requires_grad


def test_perceptual_loss_names_the_missing_weights_file(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path))
    assert vgg16_cache_path() == tmp_path / "checkpoints" / VGG16_FILE
    with pytest.raises(FileNotFoundError, match=VGG16_FILE) as err:
        PerceptualLoss()
    assert "perceptual_weight=0" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        PerceptualLoss(vgg_weights=str(tmp_path / "nowhere.pth"))


def test_perceptual_weight_without_module_is_rejected():
    with pytest.raises(ValueError, match="perceptual"):
        AutoencoderLoss(discriminator=PatchDiscriminator(ch=8), perceptual_weight=1.0)


@pytest.mark.parametrize("name", ["kl_weight", "pixel_weight", "perceptual_weight", "disc_weight", "disc_factor"])
def test_negative_loss_weights_are_refused_with_their_key(name):
    with pytest.raises(ValueError, match=rf"model\.loss\.{name}=-1\.0: expected >= 0"):
        AutoencoderLoss(discriminator=PatchDiscriminator(ch=8, n_layers=1), **{name: -1.0})
