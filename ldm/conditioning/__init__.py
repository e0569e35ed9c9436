"""Condition embedders (class, OpenCLIP text) and the Conditioner that applies conditioning dropout."""

from ldm.conditioning.class_embedder import ClassEmbedder
from ldm.conditioning.conditioner import Conditioner
from ldm.conditioning.text import OpenCLIPTextEmbedder

__all__ = ["ClassEmbedder", "Conditioner", "OpenCLIPTextEmbedder"]
