"""Class labels -> learned embeddings, with an extra "null" class for classifier-free guidance."""

from __future__ import annotations

import torch
from torch import nn

from ldm.utils.transfer import to_device


class ClassEmbedder(nn.Module):
    """``num_classes`` labels plus a null label (index ``num_classes``) -> ``embed_dim`` vectors.

    ``output="context"`` gives one cross-attention token (B, 1, D); ``output="y"`` a vector (B, D)
    added to the U-Net's timestep embedding.
    """

    input_key = "class_label"

    def __init__(self, num_classes: int, embed_dim: int, output: str = "y", ucg_rate: float = 0.0,
                 class_names: list[str] | None = None):
        super().__init__()
        if output not in ("context", "y"):
            raise ValueError(f"ClassEmbedder output must be 'context' or 'y', not '{output}'")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"model.conditioner.embedders.0.num_classes={num_classes}, but the data names "
                             f"{len(class_names)} classes (classes.json beside the shards): set num_classes="
                             f"{len(class_names)}")
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        self.num_classes, self.embed_dim, self.output, self.ucg_rate = num_classes, embed_dim, output, ucg_rate
        self.frozen = False
        self.embedding = nn.Embedding(num_classes + 1, embed_dim)

    def label_of(self, label: int | str) -> int:
        """A class index, or a class name (as the data's ``classes.json`` names it) -> its index."""
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            if self.class_names is None or label not in self.class_names:
                known = f"one of {self.class_names}" if self.class_names else "an index (this model has no names)"
                raise ValueError(f"class_labels: unknown class '{label}'; expected {known}")
            return self.class_names.index(label)
        return int(label)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def drop(self, labels: torch.Tensor, mask: list[bool]) -> torch.Tensor:
        """Replace the labels where ``mask`` is True by the null label."""
        labels = torch.as_tensor(labels)
        keep_out = to_device(torch.tensor(mask, dtype=torch.bool), labels.device)
        return torch.where(keep_out, torch.full_like(labels, self.null_label), labels)

    def null_input(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.full((batch_size,), self.null_label, dtype=torch.long, device=device)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.embedding.weight.device)
        bad = (labels < 0) | (labels > self.num_classes)
        if bad.any():
            raise ValueError(f"class labels must be in [0, {self.num_classes}] ({self.num_classes} = null); "
                             f"got {labels[bad].unique().tolist()}")
        emb = self.embedding(labels)
        return emb[:, None] if self.output == "context" else emb
