"""EMA of the trainable weights with warm-up, on top of Lightning's ``WeightAveraging``.

Lightning swaps the averaged weights in for validation, stores them as the checkpoint's
``state_dict`` (the raw weights go to ``current_model_state``) and restores both on resume.
"""

from __future__ import annotations

from collections import defaultdict

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import AveragedModel


def ema_decay(decay: float, warmup: bool, num_averaged: int | torch.Tensor) -> float | torch.Tensor:
    """d = min(decay, (1 + n)/(10 + n)) with warm-up, else ``decay`` (``n`` a number or a device tensor).

    The warm-up (as in CompVis' LitEma) lets early averages follow the fast-moving weights
    instead of being dominated by the random initialisation.
    """
    if not warmup:
        return decay
    ratio = (1.0 + num_averaged) / (10.0 + num_averaged)
    return ratio.clamp(max=decay) if isinstance(ratio, torch.Tensor) else min(decay, ratio)


class EMAModel(AveragedModel):
    """``AveragedModel`` whose update is averaged <- d averaged + (1 - d) current for what training changes.

    Only parameters that require grad are averaged, in one ``torch._foreach_lerp_`` per device and dtype;
    frozen parameters (a frozen text encoder) stay as first copied and buffers follow the model (an
    attention mask holding -inf would turn into NaN under lerp). Nothing is read back to the host: the
    warm-up decay comes from the device count ``n_averaged``, and a step the non-finite guard skipped
    (``model.guard.last_flag``) leaves the average and its count unchanged.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool, device: torch.device | str | None = None):
        super().__init__(model, device=device, use_buffers=True)
        self.decay, self.warmup = decay, warmup
        self._copied = False

    def load_state_dict(self, *args, **kwargs):
        result = super().load_state_dict(*args, **kwargs)
        self._copied = True  # the average was restored
        return result

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        pairs = list(zip(self.module.parameters(), model.parameters(), strict=True))
        buffers = list(zip(self.module.buffers(), model.buffers(), strict=True))
        if not self._copied:  # the first update copies everything (weights may have been loaded after setup)
            for a, c in pairs + buffers:
                a.copy_(c)
            self.n_averaged += 1
            self._copied = True
            return
        guard = getattr(model, "guard", None)
        skipped = getattr(guard, "last_flag", None)
        keep = torch.ones((), device=self.n_averaged.device) if skipped is None else 1.0 - skipped.to(
            self.n_averaged.device)
        decay = ema_decay(self.decay, self.warmup, self.n_averaged.float())
        groups: dict = defaultdict(lambda: ([], []))
        for a, c in pairs:
            if c.requires_grad:
                averaged, current = groups[(a.device, a.dtype)]
                averaged.append(a)
                current.append(c.to(a.device))
        for (device, dtype), (averaged, current) in groups.items():
            torch._foreach_lerp_(averaged, current, ((1.0 - decay) * keep).to(device, dtype))
        for a, c in buffers:  # buffers are not trained (masks with -inf, counters): they follow the model
            a.copy_(c)
        self.n_averaged += keep.long()


class EMA(WeightAveraging):
    """Exponential moving average of the trainable parameters, updated each step."""

    def __init__(self, decay: float = 0.9999, warmup: bool = True, update_every_n_steps: int = 1,
                 device: str | None = None):
        super().__init__(device=device, use_buffers=True)
        self.decay = decay
        self.warmup = warmup
        self.update_every_n_steps = update_every_n_steps

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            pl_module.configure_model()  # our stages build (and optionally compile) there; idempotent
            self._average_model = EMAModel(pl_module, self.decay, self.warmup, self._device or pl_module.device)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0

    def on_train_end(self, trainer, pl_module) -> None:
        """Keep the raw weights in the module when training ends.

        Lightning's default copies the average into the module here, but ModelCheckpoint may write
        ``last.ckpt`` afterwards, which would then hold the EMA weights as the "current" ones and a
        resume would continue from the average. Exports read :meth:`averaged_module` instead.
        """

    def averaged_module(self) -> torch.nn.Module | None:
        """The module holding the averaged weights (None before fit starts)."""
        return None if self._average_model is None else self._average_model.module


def averaged_or(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The EMA callback's averaged copy of the module when that callback is on, else the module itself."""
    ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
    averaged = ema.averaged_module() if ema is not None else None
    return averaged if averaged is not None else pl_module
