"""Embedders and the Conditioner: dropout rate, null conditions, OpenCLIP text towers and their weights."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from ldm.conditioning import ClassEmbedder, Conditioner, OpenCLIPTextEmbedder

TINY_TEXT = {"width": 32, "layers": 2, "heads": 2, "context_length": 8}


def test_observed_dropout_rate_matches_ucg_rate():
    """n = 20000 draws of Bernoulli(0.3): standard error 0.0032; we allow 0.015 (about 4.6 SE)."""
    emb = ClassEmbedder(10, 8, output="y", ucg_rate=0.3)
    cond = Conditioner([emb], generator_seed=0).train()
    labels = torch.randint(0, 10, (20000,))
    seen = {}
    emb.forward = lambda values: (seen.setdefault("labels", values), torch.zeros(len(values), 8))[1]
    cond({"class_label": labels})
    dropped = (seen["labels"] == emb.null_label).float().mean().item()
    assert abs(dropped - 0.3) < 0.015
    seen.clear()
    cond.eval()({"class_label": labels})
    assert (seen["labels"] == labels).all()  # no dropout outside training


def test_caption_dropout_uses_the_empty_caption_per_sample():
    text = OpenCLIPTextEmbedder(TINY_TEXT, frozen=False, layer="last", ucg_rate=0.5)
    cond = Conditioner([text], generator_seed=1).train()
    captions = [f"caption {i}" for i in range(400)]
    seen = []
    original = text.forward
    text.forward = lambda values: (seen.append(list(values)), original(values))[1]
    out = cond({"caption": captions})
    assert out["context"].shape == (400, 8, 32) and out["y"] is None
    empties = sum(c == "" for c in seen[0])
    assert 150 < empties < 250  # Binomial(400, 0.5): mean 200, SE 10
    assert all(c == "" or c == captions[i] for i, c in enumerate(seen[0]))


def test_force_uncond_and_negative_prompt_conditions():
    text = OpenCLIPTextEmbedder(TINY_TEXT, frozen=False, layer="last")
    cls = ClassEmbedder(10, 32, output="context")
    cond = Conditioner([text, cls]).eval()
    batch = {"caption": ["a photo of a bag", "a photo of a coat"], "class_label": torch.tensor([8, 4])}
    out = cond(batch)
    assert out["context"].shape == (2, 9, 32)  # 8 text tokens + 1 class token
    null = cond(batch, force_uncond=True)
    torch.testing.assert_close(null["context"][:, :8], text(["", ""]))
    torch.testing.assert_close(null["context"][:, 8:], cls(torch.tensor([10, 10])))
    neg = cond.uncond(2, {"caption": ["blurry", "blurry"]})
    torch.testing.assert_close(neg["context"][:, :8], text(["blurry", "blurry"]))
    torch.testing.assert_close(neg["context"][:, 8:], null["context"][:, 8:])


def test_context_widths_must_agree():
    with pytest.raises(ValueError, match="different widths"):
        Conditioner([OpenCLIPTextEmbedder(TINY_TEXT), ClassEmbedder(10, 16, output="context")])


def test_class_embedder_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\]"):
        ClassEmbedder(10, 4)(torch.tensor([3, 11]))


def test_text_layers_frozen_and_trainable():
    frozen = OpenCLIPTextEmbedder(TINY_TEXT, layer="penultimate", frozen=True)
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.text.training
    trainable = OpenCLIPTextEmbedder(TINY_TEXT, layer="last", frozen=False)
    trainable.load_state_dict(frozen.state_dict())
    assert all(p.requires_grad for p in trainable.parameters())
    caps = ["a photo of a sneaker"]
    assert not torch.allclose(frozen(caps), trainable(caps))  # penultimate != last layer
    assert Conditioner([trainable]).trainable_parameters() and not Conditioner([frozen]).trainable_parameters()
    with pytest.raises(ValueError, match="embed_dim=64 but the text tower"):
        OpenCLIPTextEmbedder(TINY_TEXT, embed_dim=64)


@pytest.mark.parametrize("arch,layer", [(TINY_TEXT, "last"), (TINY_TEXT, "penultimate"), ("RN50", "penultimate")])
def test_trainable_tower_trains_exactly_the_parameters_its_features_use(arch, layer):
    """Every parameter left trainable gets a gradient, every other one is frozen: under ``penultimate`` the last
    block, for a named architecture also the pooled-output projection (DDP then needs no unused-parameter search)."""
    text = OpenCLIPTextEmbedder(arch, layer=layer, frozen=False)
    text(["a photo of a bag", "a photo of a coat"]).square().mean().backward()
    trainable = {n for n, p in text.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in text.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trainable == with_grad
    last = f"text.transformer.resblocks.{len(text.text.transformer.resblocks) - 1}."
    assert any(n.startswith(last) for n in trainable) == (layer == "last")
    assert "text.token_embedding.weight" in trainable and "text.ln_final.weight" in trainable
    if arch == "RN50":
        assert "text.text_projection" not in trainable
    assert Conditioner([text]).trainable_parameters() == [p for p in text.parameters() if p.requires_grad]


def test_open_clip_architecture_by_name_with_weights_from_a_local_file(tmp_path):
    """A real open_clip architecture (by name), random weights the test saves, loaded from the file."""
    source = OpenCLIPTextEmbedder("RN50", pretrained=None, layer="penultimate")
    full_clip_like = {k: v for k, v in source.text.state_dict().items()} | {"visual.dummy": torch.zeros(1)}
    path = tmp_path / "open_clip_rn50.safetensors"
    save_file(full_clip_like, str(path))
    loaded = OpenCLIPTextEmbedder("RN50", pretrained=str(path), layer="penultimate")
    caps = ["a photo of a trouser", "a photo of a bag"]
    torch.testing.assert_close(loaded(caps), source(caps))
    assert loaded.embed_dim == 512 and loaded.context_length == 77


def test_missing_weights_file_and_unreachable_tag_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OpenCLIPTextEmbedder("RN50", pretrained=str(tmp_path / "nope.safetensors"))
    # Offline as a machine without internet would be, without waiting for its connection timeouts (the hub reads
    # HF_HUB_OFFLINE when it is first imported: an earlier test may have imported it already).
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="pass the local file as pretrained="):
        OpenCLIPTextEmbedder("RN50", pretrained="openai")


def test_frozen_text_features_are_computed_once_per_caption(monkeypatch):
    text = OpenCLIPTextEmbedder(TINY_TEXT, layer="penultimate", frozen=True)
    caps = ["a photo of a bag", "a photo of a coat", "a photo of a bag"]
    expected = text.encode(caps)
    calls = []
    original = text.encode
    monkeypatch.setattr(text, "encode", lambda c: calls.append(list(c)) or original(c))
    torch.testing.assert_close(text(caps), expected)
    torch.testing.assert_close(text(["a photo of a coat", "", "a photo of a bag"]),
                               torch.stack([expected[1], original([""])[0], expected[0]]))
    assert calls == [["a photo of a bag", "a photo of a coat"], [""]]  # each distinct caption encoded once
    trainable = OpenCLIPTextEmbedder(TINY_TEXT, layer="last", frozen=False)
    assert trainable(caps).requires_grad  # trainable towers are never cached


def test_trainable_tower_encodes_repeated_captions_once_with_the_same_gradients(monkeypatch):
    torch.manual_seed(0)
    text = OpenCLIPTextEmbedder(TINY_TEXT, layer="last", frozen=False).train()
    caps = ["a photo of a bag", "a photo of a coat", "a photo of a bag", "", "a photo of a coat"]
    weight = torch.randn(len(caps), text.context_length, text.embed_dim)
    expected = text.encode(caps)
    expected_grads = torch.autograd.grad((expected * weight).sum(), list(text.parameters()))
    calls = []
    original = text.encode
    monkeypatch.setattr(text, "encode", lambda c: calls.append(list(c)) or original(c))
    out = text(caps)
    grads = torch.autograd.grad((out * weight).sum(), list(text.parameters()))
    assert calls == [["a photo of a bag", "a photo of a coat", ""]]
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-3)  # summation order differs
    text.text.transformer.resblocks[0].attn.dropout = 0.1  # a stochastic tower runs every caption
    calls.clear()
    text(caps)
    assert calls == [caps]


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_ucg_rate_outside_0_1_is_refused_with_its_key(rate):
    with pytest.raises(ValueError, match=rf"model\.conditioner\.embedders\.1\.ucg_rate={rate}: expected a probability"):
        Conditioner([ClassEmbedder(10, 8, output="context"), ClassEmbedder(10, 8, ucg_rate=rate)])


def test_a_caption_longer_than_the_context_warns_once_naming_the_limit(caplog):
    text = OpenCLIPTextEmbedder(TINY_TEXT, frozen=False, layer="last")
    long = "a photo of a very long sneaker with white laces and a thick sole"
    assert text.truncated(["a photo of a bag", long]) == [long]
    with caplog.at_level(logging.WARNING, logger="ldm.conditioning.text"):
        text.tokenize(["a photo of a bag", long, long])
        text.tokenize([long])  # seen: training does not repeat it every step
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "context of 8 tokens" in warnings[0] and "1 prompt(s)" in warnings[0]
