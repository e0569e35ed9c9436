"""Optimiser steps whose loss or gradients went non-finite change nothing; a run of them stops training.

The decision is made on the device: a fused optimiser (our configs' Adam/AdamW) takes it as its
``found_inf`` argument and leaves parameters, moments and step count untouched, as it does for a
GradScaler. Counters stay on the device too and are read back only on logging steps (``read``), so a
training step never waits for the device. Any other optimiser gets the same skip from one host read
per step (its gradients are dropped when the flag is set).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import lightning as L
import torch
import torch.distributed as dist

from ldm.utils.lightning_internals import batches_that_stepped, uncount_optimizer_steps

log = logging.getLogger(__name__)


def is_logging_step(trainer: L.Trainer | None) -> bool:
    """Whether Lightning writes the logs after this batch (where reading device values back is paid anyway)."""
    if trainer is None:
        return True
    stepped = batches_that_stepped(trainer) + 1
    return stepped % max(1, trainer.log_every_n_steps) == 0 or trainer.should_stop


def _supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups)


class NonFiniteGuard:
    """Skips (on the device) optimiser steps with a non-finite loss part or gradient, and counts them.

    ``parts`` are the names of what is checked each step: loss parts first, then ``grad:<group>`` for
    each parameter group. ``max_consecutive`` skipped steps in a row stop training (at the next logging
    step, with an error naming where it happened and what went bad); the weights were never touched.
    Under DDP the flag is max-reduced over ranks (a device collective), so every rank skips together.
    """

    def __init__(self, max_consecutive: int = 5, name: str = ""):
        if max_consecutive < 1:
            raise ValueError(f"model.max_nonfinite={max_consecutive}: expected >= 1")
        self.max_consecutive = max_consecutive
        self.name = name
        self.skipped = 0                 # as of the last read (host)
        self._state: torch.Tensor | None = None  # [skipped, consecutive, worst run, calls at worst end]
        self._bad_parts: torch.Tensor | None = None
        self._part_names: list[str] = []
        self._calls = 0                  # host count of checks
        self._read_calls = 0
        self.last_flag: torch.Tensor | None = None  # 1.0 when the latest checked step was skipped

    def _init_state(self, device: torch.device, names: list[str]) -> None:
        """Counters on ``device`` (kept when already there); the per-part flags follow the checked parts by name
        (the autoencoder adds its GAN parts at ``disc_start``)."""
        if self._state is None:
            self._state = torch.zeros(4, device=device)
        elif self._state.device != device:
            self._state = self._state.to(device)
        if names != self._part_names:
            old = dict(zip(self._part_names, self._bad_parts, strict=True)) if self._bad_parts is not None else {}
            self._bad_parts = torch.stack([old[n].to(device) if n in old else torch.zeros((), device=device)
                                           for n in names])
            self._part_names = names

    def step(self, optimizer: torch.optim.Optimizer, parts: dict[str, torch.Tensor],
             groups: Sequence[tuple[str, Iterable[torch.Tensor]]], world_size: int = 1) -> torch.Tensor:
        """Check ``parts`` and the gradients of ``groups`` (name, parameters); arm ``optimizer`` to skip.

        Call after backward (and clipping), right before ``optimizer.step()``. Returns the device flag
        (1.0 = skipped) and also keeps it as ``last_flag`` (the EMA reads it).
        """
        checks, names = [], []
        for name, value in parts.items():
            checks.append(torch.isfinite(value.detach()).all())
            names.append(name)
        for name, params in groups:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                checks.append(torch.stack(torch._foreach_norm(grads)).isfinite().all())
                names.append(f"grad:{name}")
        bad = (~torch.stack(checks)).float()
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self._init_state(bad.device, names)
        flag = bad.max()
        state = self._state
        consecutive = (state[1] + 1) * flag
        worse = consecutive > state[2]
        self._calls += 1
        self._state = torch.stack([state[0] + flag, consecutive, torch.maximum(state[2], consecutive),
                                   torch.where(worse, float(self._calls), state[3])])
        self._bad_parts = torch.maximum(self._bad_parts, bad)
        self.last_flag = flag
        optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper -> the torch optimiser
        if _supports_found_inf(optimizer):
            optimizer.found_inf = flag
        elif flag.item():  # not fused: one host read decides (such an optimiser has no device-side skip)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        return flag

    @property
    def skipped_tensor(self) -> torch.Tensor | None:
        """Skipped steps so far, on the device (log it every step without a host read)."""
        return None if self._state is None else self._state[0]

    def read(self, step: int) -> int:
        """Read the counters back (on a logging step); returns the steps newly skipped since the last read.

        ``step`` is the trainer's optimiser step count, which still includes the newly skipped ones.

        Raises ``FloatingPointError`` when ``max_consecutive`` checks in a row were skipped.
        """
        if self._state is None:
            return 0
        skipped, _, worst, worst_end = (int(v) for v in self._state.tolist())
        bad_parts = [n for n, b in zip(self._part_names, self._bad_parts.tolist(), strict=True) if b]
        new = skipped - self.skipped
        self.skipped = skipped
        step -= new  # the skipped steps are not steps of training (see uncount_steps)
        who = f"{self.name} " if self.name else ""
        if new:
            log.warning("%snon-finite values (%s) in %d of the last %d steps up to step %d: those optimiser steps "
                        "were skipped (weights and optimiser state unchanged; %d skipped in all)", who,
                        ", ".join(bad_parts), new, self._calls - self._read_calls, step, skipped)
        self._read_calls = self._calls
        if worst >= self.max_consecutive:
            end = step - (self._calls - worst_end)
            raise FloatingPointError(
                f"training stopped at step {step}: {worst} {who}steps in a row had non-finite values (the run ended "
                f"at step {end}; went bad: {', '.join(bad_parts)}). The weights and optimiser state are those of the "
                "last finite step, and so is every checkpoint. Lower the learning rate, enable gradient clipping "
                "(model.grad_clip / trainer.gradient_clip_val) or check the data, then resume with ckpt_path=last")
        # The worst run and the parts are per read window; the current run carries over.
        self._state = torch.stack([self._state[0], self._state[1], self._state[1], self._state[3]])
        self._bad_parts.zero_()
        return new


def uncount_steps(trainer: L.Trainer, steps: int) -> None:
    """Take ``steps`` skipped optimiser steps back out of Lightning's step count (``global_step``, max_steps).

    Lightning counts a call to ``optimizer.step()`` whatever the optimiser then did; a step the guard
    skipped changed nothing and is not a step of training.
    """
    if steps > 0:
        uncount_optimizer_steps(trainer, steps)


def refuse_nonfinite_weights(module: torch.nn.Module, step: int) -> None:
    """Raise before a checkpoint is written from weights holding NaN/inf (the previous checkpoint stays as it is).

    The guard keeps non-finite gradients out of the weights; this catches what it cannot see, e.g. a finite
    update so large that the weights overflowed. One host read per checkpoint."""
    bad = [name for name, p in module.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad:
        raise FloatingPointError(
            f"step {step}: {len(bad)} weight tensors hold NaN/inf (e.g. {', '.join(bad[:3])}); no checkpoint was "
            "written from them and the previous checkpoints are kept. Lower the learning rate or enable gradient "
            "clipping, then resume from the last checkpoint with ckpt_path=last")
