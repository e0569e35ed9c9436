"""``model.init_from``: start a stage's networks from pretrained weights (fine-tuning), with a report.

Accepted, for stage 2 (U-Net and conditioner) and stage 1 (the autoencoder):
  - an export folder of this framework (``exports/ldm_f8``, ``exports/ae_f8``),
  - a Lightning checkpoint of this framework (EMA weights when present),
  - a CompVis / Stable Diffusion checkpoint (``model.diffusion_model.*``, ``first_stage_model.*``),
  - a diffusers folder: a model folder (``config.json``) or a pipeline folder (its ``unet/`` or ``vae/``).
Tensors whose names and shapes match are loaded; the report names what was not (missing, unexpected, other
shapes). A source that matches nothing is an error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoints import load_pickle_safely, read_pipeline, read_safetensors, read_state_dict
from ldm.interop.compvis import FIRST_STAGE_PREFIX, UNET_PREFIX
from ldm.interop.diffusers import from_diffusers_state, read_diffusers_folder
from ldm.utils.files import CONFIG, WEIGHTS

log = logging.getLogger(__name__)


def _prefixed(state: dict[str, torch.Tensor], prefix: str, into: str) -> dict[str, torch.Tensor]:
    return {into + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _diffusers(path: Path, targets: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """A diffusers model folder, or the matching sub-folder of a pipeline folder, under our names."""
    out = {}
    for name, module in targets.items():
        sub = {"unet": "unet", "autoencoder": "vae"}.get(name)
        folder = path / sub if sub and (path / sub / "config.json").is_file() else path
        if not (folder / "config.json").is_file() or not hasattr(module, "arch"):
            continue
        _, state, _ = read_diffusers_folder(folder)
        out |= {f"{name}.{k}": v for k, v in from_diffusers_state(module, state).items()}
    return out


def source_state(path: str | Path, targets: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The weights at ``path`` under the stage's names (``unet.*``, ``conditioner.*``, ``autoencoder.*``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model.init_from={path}: no such file or folder (expected an export folder, a .ckpt, "
                                "a CompVis/SD checkpoint or a diffusers folder)")
    if path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).is_file():  # our export
        if "autoencoder" in targets:
            return {f"autoencoder.{k}": v for k, v in read_safetensors(path / WEIGHTS).items()}
        return read_pipeline(path)[2]
    if path.is_dir():
        return _diffusers(path, targets)
    state = read_state_dict(path, "model.init_from") if path.suffix == ".safetensors" else None
    if state is None:
        ckpt = load_pickle_safely(path, "model.init_from")
        if isinstance(ckpt, dict) and "ldm_config" in ckpt and "autoencoder" not in targets:
            return read_pipeline(path)[2]  # a stage-2 checkpoint of ours (EMA weights)
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    if any(k.startswith(UNET_PREFIX) for k in state) or any(k.startswith(FIRST_STAGE_PREFIX) for k in state):
        return _prefixed(state, UNET_PREFIX, "unet.") | _prefixed(state, FIRST_STAGE_PREFIX, "autoencoder.")
    return state  # a checkpoint of ours (stage 1: autoencoder.*) or any state dict with our names


def init_from(path: str | Path, targets: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Load what matches from ``path`` into ``targets`` (name -> module); log and return the report."""
    state = source_state(path, targets)
    own = {f"{name}.{k}": v for name, module in targets.items() for k, v in module.state_dict().items()}
    matched = [k for k in own if k in state and state[k].shape == own[k].shape]
    report = {"loaded": matched, "missing": [k for k in own if k not in state],
              "unexpected": sorted(k for k in state if k not in own),
              "other shape": [k for k in own if k in state and state[k].shape != own[k].shape]}
    if not matched:
        raise ValueError(f"model.init_from={path}: none of its {len(state)} tensors matches this model "
                         f"({len(own)} tensors, e.g. {list(own)[:3]}); is it the other stage's file, or another "
                         "architecture?")
    for name, module in targets.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: state[k] for k in matched if k.startswith(prefix)}, strict=False)
    log.info("init_from %s: %d of %d tensors loaded; %d missing %s, %d unexpected %s, %d of another shape %s", path,
             len(matched), len(own), len(report["missing"]), report["missing"][:5], len(report["unexpected"]),
             report["unexpected"][:5], len(report["other shape"]), report["other shape"][:5])
    return report
