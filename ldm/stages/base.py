"""What both stages share: in-place compilation, the non-finite guards' bookkeeping, and checkpoint hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from torch import nn

from ldm.stages.guard import NonFiniteGuard, is_logging_step, refuse_nonfinite_weights, uncount_steps
from ldm.utils.compiling import check_compile_mode, compile_in_place

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


class Stage(L.LightningModule):
    """Base of the two stages. Subclasses name the networks to compile (:meth:`compiled_networks`) and their
    non-finite guards (:meth:`guards`); this class compiles once, reads the guards on logging steps, and writes
    the resolved run config into every checkpoint (refusing one from non-finite weights)."""

    def __init__(self, compile: bool = False, compile_mode: str = "default"):
        super().__init__()
        self.compile_networks = compile
        self.compile_mode = check_compile_mode(compile_mode)
        self.run_config: dict[str, Any] | None = None  # set by ldm.training.train

    # Set by each stage: the submodules torch.compile works on, and the attributes holding its guards.
    compiled: tuple[str, ...] = ()
    guard_names: tuple[str, ...] = ()

    def compiled_networks(self) -> dict[str, nn.Module]:
        return {name: self.get_submodule(name) for name in self.compiled}

    def guards(self) -> list[NonFiniteGuard]:
        return [getattr(self, name) for name in self.guard_names]

    def configure_model(self) -> None:
        # Lightning may call this hook more than once; compile in place once (parameter names unchanged).
        if self.compile_networks and not getattr(self, "_compiled", False):
            compile_in_place(self.compiled_networks(), self.compile_mode)
            self._compiled = True

    def _read_guards(self) -> None:
        """Host reads of the guards' device counters (logging steps and the end only); skipped steps uncounted."""
        for guard in self.guards():
            uncount_steps(self.trainer, guard.read(self.global_step))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if is_logging_step(self._trainer):
            self._read_guards()

    def on_train_end(self) -> None:
        self._read_guards()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        refuse_nonfinite_weights(self, self.global_step)
        # The resolved run config travels inside every checkpoint so it alone rebuilds the model.
        if self.run_config is not None:
            checkpoint["ldm_config"] = self.run_config
