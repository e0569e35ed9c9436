"""The open_clip internal the text embedder relies on, in one place, pinned by ``tests/test_internals.py``: the
text tower's token embedding step (token + position embeddings and the causal mask) without its pooling, which
open_clip's public ``encode_text`` does not expose per layer."""

from __future__ import annotations

import torch
from torch import nn


def embed_tokens(tower: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(token features entering the first transformer block, attention mask) of open_clip's ``TextTransformer``."""
    return tower._embeds(tokens)
