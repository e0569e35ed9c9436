"""The open_clip internals the text embedder relies on, in one place, pinned by ``tests/test_internals.py``: the
text tower of a named architecture built alone (open_clip's public ``create_model`` builds the image tower too),
and its token embedding step (token + position embeddings and the causal mask) without its pooling, which
open_clip's public ``encode_text`` does not expose per layer. open_clip is imported on first use: a process
that builds no text tower (stage 1, class-conditional models) does not pay for the import."""

from __future__ import annotations

import torch
from torch import nn


def build_text_tower(arch: str) -> nn.Module:
    """The text tower of open_clip architecture ``arch`` (random weights), without its image tower."""
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture '{arch}' (see open_clip.list_models())")
    return open_clip.model._build_text_tower(cfg["embed_dim"], open_clip.model.CLIPTextCfg(**cfg["text_cfg"]))


def embed_tokens(tower: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(token features entering the first transformer block, attention mask) of open_clip's ``TextTransformer``."""
    return tower._embeds(tokens)
