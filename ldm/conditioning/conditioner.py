"""The Conditioner: batch -> ``{"context", "y"}`` with per-embedder conditioning dropout.

Each embedder reads one batch key (``caption``, ``class_label``), has its own ``ucg_rate`` and
produces either cross-attention tokens (``context``, concatenated along the token axis) or a vector
(``y``, concatenated along the feature axis). During training each sample's condition of each
embedder is replaced by the null condition with probability ``ucg_rate`` (independently per
embedder, as in generative-models' GeneralConditioner), which teaches the unconditional model
that classifier-free guidance needs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import nn


class Conditioner(nn.Module):
    """Runs every embedder over its batch key; ``force_uncond`` gives the null condition for all samples."""

    def __init__(self, embedders: Sequence[nn.Module], generator_seed: int | None = None):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)
        for i, e in enumerate(self.embedders):
            if not 0.0 <= e.ucg_rate <= 1.0:
                raise ValueError(f"model.conditioner.embedders.{i}.ucg_rate={e.ucg_rate}: expected a probability in "
                                 "[0, 1]")
        widths = {e.embed_dim for e in self.embedders if e.output == "context"}
        if len(widths) > 1:
            raise ValueError(f"context embedders have different widths {sorted(widths)}; they must agree")
        self.context_dim = widths.pop() if widths else None
        ys = [e.embed_dim for e in self.embedders if e.output == "y"]
        self.adm_dim = sum(ys) if ys else None
        # Dropout decisions are drawn on the host (captions are host strings; labels get the mask with an
        # asynchronous copy), so conditioning never reads a device value back. Seeded from Python's global RNG
        # (which the run's seed sets) unless a seed of its own is given.
        self.rng = random.Random(generator_seed if generator_seed is not None else random.getrandbits(64))

    @property
    def input_keys(self) -> list[str]:
        return [e.input_key for e in self.embedders]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for e in self.embedders if not e.frozen for p in e.parameters() if p.requires_grad]

    def _batch_size(self, batch: dict) -> int:
        for e in self.embedders:
            if e.input_key in batch:
                return len(batch[e.input_key])
        raise KeyError(f"batch has none of the conditioning keys {self.input_keys}")

    def uncond(self, batch_size: int, overrides: dict | None = None) -> dict[str, torch.Tensor | None]:
        """The null condition for every embedder, except the batch keys given in ``overrides``
        (a negative prompt is ``{"caption": [...]}``)."""
        overrides = overrides or {}
        batch = {e.input_key: overrides.get(e.input_key, e.null_input(batch_size)) for e in self.embedders}
        return self._embed(batch)

    def _embed(self, batch: dict) -> dict[str, torch.Tensor | None]:
        out: dict[str, list[torch.Tensor]] = {"context": [], "y": []}
        for e in self.embedders:
            out[e.output].append(e(batch[e.input_key]))
        return {"context": torch.cat(out["context"], dim=1) if out["context"] else None,
                "y": torch.cat(out["y"], dim=1) if out["y"] else None}

    def forward(self, batch: dict, force_uncond: bool = False) -> dict[str, torch.Tensor | None]:
        n = self._batch_size(batch)
        if force_uncond:
            return self.uncond(n)
        values = {}
        for e in self.embedders:
            if e.input_key not in batch:
                raise KeyError(f"the {type(e).__name__} needs batch key '{e.input_key}'")
            v = batch[e.input_key]
            if self.training and e.ucg_rate > 0:
                v = e.drop(v, [self.rng.random() < e.ucg_rate for _ in range(n)])
            values[e.input_key] = v
        return self._embed(values)
