"""OpenCLIP text encoder as the condition of the U-Net's cross-attention.

Two uses:
- frozen and pretrained (Stable Diffusion 2 style): an open_clip architecture name plus a
  pretrained tag (downloaded by open_clip) or a local weights file, tokens from the last or the
  penultimate layer;
- trainable from scratch (the LDM paper's jointly trained text transformer): the same tower built
  from a small config dict — the offline default, since no pretrained weights can be fetched here.
Tokenisation is open_clip's own BPE tokenizer, which ships with the package.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.checkpoints import read_state_dict
from ldm.conditioning.open_clip_internals import build_text_tower, embed_tokens
from ldm.utils.transfer import to_device

log = logging.getLogger(__name__)
LAYERS = ("last", "penultimate")


class OpenCLIPTextEmbedder(nn.Module):
    """Captions -> (B, context_length, width) token features.

    Args:
        arch: open_clip model name (e.g. ``"ViT-H-14"``) or a dict of text-tower settings
            (``width``, ``layers``, ``heads``, ``context_length``, optional ``vocab_size``).
        pretrained: open_clip pretrained tag (e.g. ``"laion2b_s32b_b79k"``) or a path to a weights file
            (an open_clip checkpoint, full CLIP or text tower). ``None``: random initialisation.
        layer: ``last`` or ``penultimate`` (Stable Diffusion 2 uses the penultimate, then ``ln_final``).
        frozen: no gradients, always in eval mode, outside the optimiser.
        embed_dim: the expected width (checked), so configs can share it with the U-Net's context_dim.
    """

    input_key = "caption"
    CACHE_LIMIT = 100_000
    output = "context"

    def __init__(self, arch: str | dict[str, Any] = "ViT-H-14", pretrained: str | None = None,
                 layer: str = "penultimate", frozen: bool = True, ucg_rate: float = 0.0,
                 embed_dim: int | None = None):
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"OpenCLIPTextEmbedder layer must be one of {LAYERS}, not '{layer}'")
        self.layer = layer
        self.ucg_rate = ucg_rate
        self.frozen = frozen
        import open_clip  # here, not at the top: only a process that builds a text tower pays for the import

        if isinstance(arch, str):
            self.text = build_text_tower(arch)
            self.tokenizer = open_clip.get_tokenizer(arch)
        else:
            settings = dict(arch)
            self.text = open_clip.transformer.TextTransformer(
                context_length=settings.get("context_length", 77), vocab_size=settings.get("vocab_size", 49408),
                width=settings["width"], heads=settings["heads"], layers=settings["layers"], output_dim=None)
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=settings.get("context_length", 77))
        if pretrained is not None:
            self._load_pretrained(arch, pretrained)
        self.embed_dim = self.text.width
        if embed_dim is not None and embed_dim != self.embed_dim:
            raise ValueError(f"OpenCLIPTextEmbedder: embed_dim={embed_dim} but the text tower '{arch}' is "
                             f"{self.embed_dim} wide")
        self.context_length = self.text.context_length
        self._tokens: dict[str, torch.Tensor] = {}
        self._features: dict[str, torch.Tensor] = {}
        self._warned: set[str] = set()  # captions already reported as truncated
        if frozen:
            self.requires_grad_(False)
            self.text.eval()
        else:
            self._freeze_unused()

    def _freeze_unused(self) -> None:
        """A trainable tower trains only what :meth:`encode` runs: not the last block under ``penultimate``,
        nor the pooled-output projection. Those would get no gradient (wasted optimiser state, and DDP
        would have to search every step for parameters without one)."""
        blocks = self.text.transformer.resblocks
        depth = len(blocks) - (1 if self.layer == "penultimate" else 0)
        used = [*self.text.token_embedding.parameters(), self.text.positional_embedding,
                *self.text.ln_final.parameters(), *(p for block in blocks[:depth] for p in block.parameters())]
        if getattr(self.text, "cls_emb", None) is not None:
            used.append(self.text.cls_emb)
        used_ids = {id(p) for p in used}
        for p in self.text.parameters():
            if id(p) not in used_ids:
                p.requires_grad_(False)

    def _load_pretrained(self, arch: str | dict, pretrained: str) -> None:
        path = Path(pretrained).expanduser()
        if path.is_file():
            state = read_state_dict(path, "OpenCLIP weights")
        elif path.suffix or "/" in pretrained:
            raise FileNotFoundError(f"OpenCLIP text weights file {path} does not exist")
        else:
            if not isinstance(arch, str):
                raise ValueError("a pretrained tag needs an open_clip architecture name, not a dict")
            try:
                import open_clip

                state = open_clip.create_model(arch, pretrained=pretrained).state_dict()
            except Exception as err:  # noqa: BLE001 - network/hub failures of every kind
                raise FileNotFoundError(
                    f"could not load open_clip weights '{arch}' / '{pretrained}' ({err}). Without internet, download "
                    f"them elsewhere (open_clip.create_model('{arch}', pretrained='{pretrained}') caches them) "
                    "and pass the local file as pretrained=/path/to/open_clip_model.safetensors") from err
        own = set(self.text.state_dict())
        text_state = {k: v for k, v in state.items() if k in own}
        missing = sorted(own - set(text_state) - {"attn_mask"})
        if missing:
            raise ValueError(f"{pretrained}: text-tower weights missing for {len(missing)} keys, e.g. {missing[:5]}")
        self.text.load_state_dict(text_state, strict=False)

    def train(self, mode: bool = True) -> OpenCLIPTextEmbedder:
        return super().train(mode and not self.frozen)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids (B, context_length); each distinct caption is tokenised once and cached. Captions longer than
        the context are truncated to it, with a warning the first time each is seen (:meth:`warn_truncated`)."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._tokens]
        if missing:
            self.warn_truncated(missing, every_call=False)
            # Kept on the tower's device: a step whose captions were all seen before copies nothing from the host.
            ids = to_device(self.tokenizer(missing), self.text.token_embedding.weight.device)
            self._tokens.update(zip(missing, ids, strict=True))
        return torch.stack([self._tokens[c] for c in captions])

    def truncated(self, captions: list[str]) -> list[str]:
        """The captions whose tokens (with start and end tokens) do not fit the context."""
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:  # a tokenizer without a plain encode (not open_clip's BPE): nothing to say
            return []
        return [c for c in dict.fromkeys(captions) if len(encode(c)) + 2 > self.context_length]

    def warn_truncated(self, captions: list[str], every_call: bool = True) -> None:
        """One warning naming the context limit when some of ``captions`` are truncated to it. ``every_call``
        (the pipeline: each call with a long prompt says so) or, in training, once per caption."""
        long = [c for c in self.truncated(captions) if every_call or c not in self._warned]
        if long:
            self._warned.update(long)
            log.warning("%d prompt(s) longer than the text encoder's context of %d tokens were truncated to it (the "
                        "end is ignored), e.g. %r", len(long), self.context_length, long[0][:120])

    def drop(self, captions: list[str], mask: list[bool]) -> list[str]:
        """Replace the captions where ``mask`` is True by the empty caption."""
        return ["" if m else c for c, m in zip(captions, mask, strict=True)]

    def null_input(self, batch_size: int, device: torch.device | None = None) -> list[str]:
        return [""] * batch_size

    def encode(self, captions: list[str]) -> torch.Tensor:
        """Token features of the text tower, no caching."""
        return self.encode_tokens(self.tokenize(list(captions)))

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, context_length) -> token features of the text tower (``layer``, then ``ln_final``)."""
        x, attn_mask = embed_tokens(self.text, tokens)
        blocks = self.text.transformer.resblocks
        depth = len(blocks) - (1 if self.layer == "penultimate" else 0)
        for block in blocks[:depth]:
            x = block(x, attn_mask=attn_mask)
        return self.text.ln_final(x)

    def forward(self, captions: list[str]) -> torch.Tensor:
        """(B, context_length, width). A frozen tower's output depends on the caption alone, so each
        distinct caption is encoded once and kept (up to ``CACHE_LIMIT`` captions). A trainable tower
        without dropout encodes each distinct caption of the batch once: the same features, and the
        same gradients (indexing sums them over the repeats)."""
        captions = list(captions)
        if not self.frozen:
            unique = list(dict.fromkeys(captions))
            if len(unique) == len(captions) or self._stochastic():
                return self.encode(captions)
            position = {c: i for i, c in enumerate(unique)}
            features = self.encode(unique)
            return features[to_device(torch.tensor([position[c] for c in captions]), features.device)]
        device = self.text.token_embedding.weight.device
        missing = [c for c in dict.fromkeys(captions) if c not in self._features]
        if missing:
            with torch.no_grad():
                features = self.encode(missing)
            if len(self._features) + len(missing) <= self.CACHE_LIMIT:
                self._features.update(zip(missing, features, strict=True))
            else:
                return self.encode(captions)
        return torch.stack([self._features[c] for c in captions]).to(device)

    def _stochastic(self) -> bool:
        """Whether a training forward draws randomness (dropout), so repeated captions must run separately."""
        return self.training and any(
            (isinstance(m, nn.Dropout) and m.p > 0) or (isinstance(m, nn.MultiheadAttention) and m.dropout > 0)
            for m in self.text.modules())

    def _apply(self, fn, recurse: bool = True):
        self._features.clear()  # moved or cast: recompute on the new device / dtype
        self._tokens.clear()
        return super()._apply(fn, recurse)
