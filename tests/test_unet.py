"""U-Net and transformer blocks: shapes, zero-initialised output, conditioning inputs, checkpointing."""

import math

import pytest
import torch

from ldm.networks.attention import SpatialTransformer
from ldm.networks.device_paths import EXPLICIT_MAX_SCORES
from ldm.networks.sdpa import attention
from ldm.networks.unet import UNet, timestep_embedding


def _unet(**kw) -> UNet:
    args = dict(in_channels=4, model_channels=16, num_res_blocks=1, channel_mult=(1, 2),
                attention_resolutions=(1, 2), num_head_channels=8, context_dim=12)
    return UNet(**(args | kw))


@pytest.mark.parametrize("kw,side", [({}, 8), ({"channel_mult": (1, 2, 2), "attention_resolutions": (2,)}, 16),
                                     ({"in_channels": 16, "context_dim": None}, 4)])
def test_output_shape_matches_input(kw, side):
    net = _unet(**kw)
    x = torch.randn(2, net.in_channels, side, side)
    ctx = torch.randn(2, 5, 12) if net.context_dim else None
    assert net(x, torch.tensor([0, 999]), context=ctx).shape == x.shape


def test_output_layer_is_zero_initialised_and_transformers_start_as_identity():
    net = _unet()
    out = net(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), context=torch.randn(2, 5, 12))
    assert torch.count_nonzero(out) == 0
    st = SpatialTransformer(16, heads=2, dim_head=8, context_dim=12)
    x = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(st(x, torch.randn(1, 3, 12)), x)


def test_timestep_embedding_closed_form():
    emb = timestep_embedding(torch.tensor([0, 10]), 8)
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    expected = [math.cos(10 * f) for f in freqs] + [math.sin(10 * f) for f in freqs]
    torch.testing.assert_close(emb[1], torch.tensor(expected))
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def test_context_and_class_vector_change_the_output():
    torch.manual_seed(0)
    net = _unet(adm_in_channels=6)
    for p in net.parameters():  # leave the zero inits so that every input path reaches the output
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 400])
    y = torch.randn(2, 6)
    base = net(x, t, torch.randn(2, 5, 12), y)
    assert not torch.allclose(base, net(x, t, torch.randn(2, 5, 12), y))
    assert not torch.allclose(base, net(x, t, torch.randn(2, 5, 12), torch.randn(2, 6)))
    with pytest.raises(ValueError, match="adm_in_channels=6, y missing"):
        net(x, t, torch.randn(2, 5, 12))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = _unet()
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ckpt = _unet(use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([5, 50]), torch.randn(2, 5, 12)
    grads = []
    for net in (plain, ckpt):
        net.train()
        net(x, t, ctx).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_head_settings_are_validated():
    with pytest.raises(ValueError, match="exactly one of num_heads and num_head_channels"):
        _unet(num_heads=4, num_head_channels=8)


@pytest.mark.parametrize("n, m", [(16, 77), (64, 64)])
def test_explicit_bf16_attention_matches_sdpa(n, m):
    """The CPU bf16 path (explicit product, fp32 softmax) computes SDPA's attention and gradients."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, s, 32, dtype=torch.float64, requires_grad=True) for s in (n, m, m))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), (q, k, v))
    q16, k16, v16 = (a.detach().bfloat16().requires_grad_() for a in (q, k, v))
    out = attention(q16, k16, v16)
    grads = torch.autograd.grad(out.float().pow(2).sum(), (q16, k16, v16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.nn.functional.cosine_similarity(g.double().flatten(), r.flatten(), dim=0) > 0.999


def test_attention_keeps_the_fused_kernel_for_fp32_and_long_sequences(monkeypatch):
    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a: calls.append(a[0].shape) or fused(*a))
    attention(*(torch.randn(1, 1, 16, 8) for _ in range(3)))  # fp32: fused
    long = int(EXPLICIT_MAX_SCORES**0.5) + 1
    attention(*(torch.randn(1, 1, long, 8, dtype=torch.bfloat16) for _ in range(3)))  # too long: fused
    attention(*(torch.randn(1, 1, 16, 8, dtype=torch.bfloat16) for _ in range(3)))  # short bf16: explicit
    assert [s[-2] for s in calls] == [16, long]


@pytest.mark.parametrize("kwargs,match", [
    (dict(channel_mult=[]), r"model\.unet\.channel_mult=\[\] / model_channels=64: expected a non-empty list"),
    (dict(channel_mult=[1, 0]), r"channel_mult=\[1, 0\]"),
    (dict(model_channels=30), r"model\.unet\.num_head_channels=32 exceeds the 30 channels of attention level 0"),
    (dict(num_heads=128, num_head_channels=-1), r"model\.unet\.num_heads=128 exceeds the 64 channels"),
])
def test_bad_unet_settings_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(**{"model_channels": 64, "channel_mult": [1, 2], "attention_resolutions": [1, 2]} | kwargs)
