"""Lightning checkpoint files written atomically and read without running code.

A checkpoint is written to a temporary sibling, flushed to disk, then renamed over the target:
a run killed while saving (SIGKILL, pre-emption, a full disk) leaves the previous ``last.ckpt``
intact rather than a truncated one. Resuming reads with ``weights_only=True``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ldm.checkpoints import load_pickle_safely


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with write-to-temp + fsync + ``os.replace`` saves and weights-only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path: str | Path, map_location: Callable | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return load_pickle_safely(path, "checkpoint", map_location or "cpu")
