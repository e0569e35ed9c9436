"""torch.compile of a stage's networks, in place, so parameter names (and checkpoints) stay as in eager mode."""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"model.compile_mode={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def compile_in_place(modules: dict[str, nn.Module], mode: str = "default") -> None:
    """``module.compile(mode=mode)`` for each: the module keeps its class and ``state_dict`` keys (no
    ``_orig_mod.`` prefix, unlike ``torch.compile(module)``); compilation happens at the first call."""
    check_compile_mode(mode)
    for name, module in modules.items():
        module.compile(mode=None if mode == "default" else mode)
        log.info("torch.compile(%s, mode=%s): compiled on first use", name, mode)
