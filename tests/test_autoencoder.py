"""Autoencoder network: shapes for every f, posterior and KL against closed forms."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from ldm.networks.autoencoder import AutoencoderKL, DiagonalGaussian
from ldm.networks.resample import upsample_conv3x3


@pytest.mark.parametrize("ch_mult,z,f", [((1, 2, 4), 3, 4), ((1, 2, 4, 4), 4, 8), ((1, 2, 4, 4, 4), 16, 16)])
def test_shapes_for_every_f(ch_mult, z, f):
    ae = AutoencoderKL(ch=8, ch_mult=ch_mult, num_res_blocks=1, resolution=32, z_channels=z, embed_dim=z,
                       attn_resolutions=(32 // f,))
    x = torch.randn(2, 3, 32, 32)
    post = ae.encode(x)
    assert ae.downsampling_factor == f
    assert post.mean.shape == (2, z, 32 // f, 32 // f)
    assert ae.latent_shape() == (z, 32 // f, 32 // f)
    xrec, _ = ae(x)
    assert xrec.shape == x.shape


def test_resolution_not_divisible_by_f_is_a_clear_error():
    with pytest.raises(ValueError, match=r"resolution=36 .* f=8"):
        AutoencoderKL(ch=8, ch_mult=(1, 2, 4, 4), resolution=36)


def test_kl_and_nll_match_torch_distributions():
    torch.manual_seed(0)
    moments = torch.randn(3, 8, 4, 4)
    post = DiagonalGaussian(moments)
    q = Normal(post.mean, post.std)
    expected_kl = kl_divergence(q, Normal(torch.zeros_like(post.mean), torch.ones_like(post.std))).sum((1, 2, 3))
    torch.testing.assert_close(post.kl(), expected_kl, rtol=1e-5, atol=1e-5)
    x = torch.randn_like(post.mean)
    torch.testing.assert_close(post.nll(x), -q.log_prob(x).sum((1, 2, 3)), rtol=1e-5, atol=1e-4)


def test_posterior_sampling_statistics_and_mode():
    mean = torch.full((1, 2, 64, 64), 1.5)
    logvar = torch.full((1, 2, 64, 64), math.log(0.25))
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    z = post.sample(torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 1.5) < 0.02
    assert abs(z.std().item() - 0.5) < 0.02
    assert torch.equal(post.mode(), mean)
    # KL of N(0, 1) against N(0, 1) is exactly zero; log-variance is clamped to [-30, 20].
    assert DiagonalGaussian(torch.zeros(1, 4, 2, 2)).kl().item() == 0.0
    assert DiagonalGaussian(torch.cat([mean, torch.full_like(mean, 100.0)], 1)).logvar.max().item() == 20.0


def test_seeded_sampling_is_reproducible():
    post = DiagonalGaussian(torch.randn(2, 8, 4, 4))
    a = post.sample(torch.Generator().manual_seed(3))
    b = post.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(2, 8, 8, 8), (2, 6, 9, 12), (1, 4, 3, 5)])
def test_upsample_conv_matches_interpolate_then_conv(shape):
    """The four-phase 2x2 form (and its small-input fallback) is nearest-x2 + 3x3 conv, values and gradients."""
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    weight = torch.randn(5, shape[1], 3, 3, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    out = upsample_conv3x3(x, weight, bias)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ref)
    expected = torch.autograd.grad(ref, (x, weight, bias), grad)
    for a, b in zip(expected, torch.autograd.grad(out, (x, weight, bias), grad), strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsample_conv_gradcheck(layout):
    """The hand-written phase interleave's backward is the exact adjoint of its forward (float64), in
    either memory layout of the input."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    weight = torch.randn(3, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(upsample_conv3x3, (x, weight, bias))


def test_upsample_conv_keeps_channels_last():
    """A channels_last input gives a channels_last output (no layout round trip), with the values and
    gradients of nearest-x2 + 3x3 conv; an upstream gradient in the other layout is read correctly."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 12).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(5, 6, 3, 3, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    out = upsample_conv3x3(x, weight, bias)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    ref = F.conv2d(F.interpolate(x.detach().contiguous(), scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn(ref.shape)  # contiguous, while the output is channels_last
    expected = torch.autograd.grad(F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias,
                                            padding=1), (x, weight, bias), grad)
    got = torch.autograd.grad(out, (x, weight, bias), grad)
    assert got[0].is_contiguous(memory_format=torch.channels_last) or got[0].is_contiguous()
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(ch_mult=[]), r"model\.autoencoder\.ch_mult=\[\]: expected a non-empty list"),
    (dict(ch_mult=[1, 0]), r"model\.autoencoder\.ch_mult=\[1, 0\]"),
    (dict(ch=0), r"model\.autoencoder\.ch=0: expected an integer >= 1"),
    (dict(z_channels=0), r"model\.autoencoder\.z_channels=0: expected an integer >= 1"),
    (dict(embed_dim=0), r"model\.autoencoder\.embed_dim=0: expected an integer >= 1"),
    (dict(num_res_blocks=-1), r"model\.autoencoder\.num_res_blocks=-1: expected an integer >= 0"),
])
def test_bad_autoencoder_settings_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoencoderKL(**{"ch": 8, "ch_mult": [1, 2], "resolution": 16} | kwargs)


def test_autoencoder_without_residual_blocks_per_level_still_reconstructs_the_shape():
    ae = AutoencoderKL(ch=8, ch_mult=[1, 2], num_res_blocks=0, resolution=16)
    assert ae.decode(ae.encode(torch.randn(2, 3, 16, 16)).sample()).shape == (2, 3, 16, 16)
