"""What a resumed run needs, beyond weights and optimiser state, to continue exactly as an unbroken run would:
the random number generators' states and the position in the training data."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch

KEY = "resume_state"


class ResumeState(L.Callback):
    """Saves the RNG states (torch CPU and CUDA, Python, NumPy, the conditioner's dropout draws) in every
    checkpoint and restores them when a resumed run's training loop starts, so noise, timesteps and dropout match
    an unbroken run's (the data stream is put back at the checkpoint's epoch and batch by the datamodule)."""

    def __init__(self):
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        conditioner = getattr(pl_module, "conditioner", None)
        checkpoint[KEY] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": _numpy_state(),
            "conditioner": conditioner.rng.getstate() if conditioner is not None else None,
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._pending = checkpoint.get(KEY)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before the loop continues (an epoch-end validation the checkpoint preceded included); nothing between
        # here and the next training batch draws from these generators (the loaders have their own).
        state, self._pending = self._pending, None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        random.setstate(_tuple(state["python"]))
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        conditioner = getattr(pl_module, "conditioner", None)
        if conditioner is not None and state["conditioner"] is not None:
            conditioner.rng.setstate(_tuple(state["conditioner"]))


def _numpy_state() -> tuple:
    """NumPy's legacy RNG state with its key array as a tensor (checkpoints load weights-only: no ndarrays)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


def _tuple(value: Any) -> Any:
    """Lists back to tuples (a checkpoint loaded weights-only may give the states' tuples back as lists)."""
    return tuple(_tuple(v) for v in value) if isinstance(value, list | tuple) else value
