"""OmegaConf resolvers used by the configs, registered on import."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import OmegaConf


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX-512 BF16 or AMX), where bf16-mixed pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(accelerator: str = "auto") -> str:
    """bf16-mixed where the hardware runs it natively, else 32-true (16-mixed on pre-Ampere GPUs)."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_supports_bf16() else "32-true"


def class_prompts() -> list[str]:
    """The built-in dataset's ten class captions ("a photo of a t-shirt", ...)."""
    from ldm.data.fashion_mnist import CLASS_NAMES, caption_for

    return [caption_for(i) for i in range(len(CLASS_NAMES))]


def module_classes(*paths: str) -> set[type]:
    """Classes by dotted path, as a set (FSDP's auto-wrap policy takes a set of module classes)."""
    from hydra.utils import get_class

    return {get_class(p) for p in paths}


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("ldm.precision", auto_precision, replace=True)
    OmegaConf.register_new_resolver("ldm.cwd", lambda: os.getcwd(), replace=True)
    OmegaConf.register_new_resolver("ldm.basename", lambda path: Path(str(path)).name, replace=True)
    OmegaConf.register_new_resolver("ldm.class_prompts", class_prompts, replace=True)


register_resolvers()
