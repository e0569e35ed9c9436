"""Exporting and loading trained models as folders: ``model.safetensors`` + ``config.yaml``.

``config.yaml`` holds ``kind`` (what the folder is), ``model`` (the network's resolved
``_target_`` node, enough to rebuild it), metadata such as the latent statistics, and the full
resolved run config for provenance. Weights never go through pickle.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.networks.autoencoder import AutoencoderKL
from ldm.networks.classifier import FashionClassifier
from ldm.utils.files import CONFIG, WEIGHTS

log = logging.getLogger(__name__)

FIRST_STAGE = "first_stage"
GUIDE = "guide"  # an export's autoguidance guide model, itself an export (experiment=ldm_f8_guide writes it)


def _made_by(folder: Path) -> str | None:
    """The run folder that wrote an export (its ``run_config.paths.output_dir``), when recorded."""
    try:
        return OmegaConf.load(folder / CONFIG).run_config.paths.output_dir
    except Exception:  # noqa: BLE001 - no config, no record, or not ours: unknown
        return None


def _keep_other_runs_export(path: Path, run_config: dict | None) -> Path | None:
    """An export made by another run is moved aside to ``<name>@<that run's folder name>`` (not replaced);
    returns where it went, or None when the existing export is this run's own (a re-export replaces it)."""
    ours = ((run_config or {}).get("paths") or {}).get("output_dir")
    theirs = _made_by(path)
    if theirs is not None and ours is not None and Path(theirs) == Path(ours):
        return None
    name = Path(theirs).name if theirs else f"unknown-{int(path.stat().st_mtime)}"
    kept = path.with_name(f"{path.name}@{name}")
    n = 1
    while kept.exists():
        n += 1
        kept = path.with_name(f"{path.name}@{name}-{n}")
    os.replace(path, kept)
    log.warning("%s held the export of another run (%s): kept as %s; %s now holds this run's", path,
                theirs or "unrecorded", kept, path)
    return kept


def export_folder(path: str | Path, model: nn.Module, kind: str, model_config: dict, metadata: dict,
                  run_config: dict | None = None) -> Path:
    """Write ``path/{model.safetensors,config.yaml}`` atomically (a sibling temp dir, then rename).

    ``config.yaml`` records the run that made it (``run_config``); an export of another run found at ``path`` is
    kept beside it as ``<name>@<its run folder>``, never silently replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"kind": kind})
        doc = {"kind": kind, "model": model_config, "metadata": metadata, "run_config": run_config or {}}
        OmegaConf.save(OmegaConf.create(doc), tmp / CONFIG)
        if path.exists():
            kept = _keep_other_runs_export(path, run_config)
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if kept is None:
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s", kind, path)
    return path


# What a config inside a checkpoint or export may build: the framework's own networks, conditioners, noise
# schedules and losses (classes only). Anything else (``builtins.open``, ``shutil.copyfile``, ``os.system`` ...)
# is refused before anything is imported or called: a loaded artifact must not run code.
TRUSTED_TARGETS = ("ldm.networks.", "ldm.conditioning.", "ldm.diffusion.", "ldm.losses.")


def check_targets(node: Any, source: str | Path, where: str = "") -> None:
    """Refuse every ``_target_`` in ``node`` (nested) that is not a class of :data:`TRUSTED_TARGETS`,
    naming ``source`` (the file it came from), the key and the target."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None:
            obj = None
            if isinstance(target, str) and target.startswith(TRUSTED_TARGETS):
                from hydra.utils import get_object

                try:
                    obj = get_object(target)
                except Exception:  # noqa: BLE001 - unknown names are refused below like any other
                    obj = None
            if not isinstance(obj, type):
                raise ValueError(f"{source}: refusing to build '{target}' (at {where or 'the top'}._target_): configs "
                                 "inside checkpoints and exports may only name classes under "
                                 f"{', '.join(p + '*' for p in TRUSTED_TARGETS)}; this file was not written by the "
                                 "framework or was altered")
        for key, value in node.items():
            check_targets(value, source, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_targets(value, source, f"{where}[{i}]")


def instantiate_trusted(node: dict, source: str | Path) -> Any:
    """``hydra.utils.instantiate`` of a config read from an artifact, after :func:`check_targets`."""
    check_targets(node, source)
    return instantiate(node)


def load_config_file(path: Path) -> dict[str, Any]:
    """An export's ``config.yaml`` as a dict; one that is not valid YAML (or not a mapping) is a ``ValueError``
    naming the file, the line and what to do."""
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path}{where}: not valid YAML ({problem}). train.py writes this file with the export: undo "
                         "the edit there, or export the model again from its run's checkpoint (python train.py "
                         "<its overrides> ckpt_path=<its run folder>)") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: holds a {type(cfg).__name__}, not the export's mapping (kind, model, ...): restore "
                         "it, or export the model again from its run's checkpoint")
    return cfg


def read_export_config(path: str | Path, kind: str, make_hint: str = "") -> tuple[Path, dict[str, Any]]:
    """Validate an export folder (or its ``model.safetensors``) and return (folder, config)."""
    path = Path(path)
    folder = path.parent if path.name == WEIGHTS else path
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        hint = f" Make it with: {make_hint}" if make_hint else ""
        raise FileNotFoundError(f"no exported {kind} at {folder} (expected {WEIGHTS} and {CONFIG}).{hint}")
    cfg = load_config_file(folder / CONFIG)
    found = cfg.get("kind")
    if found != kind:
        raise ValueError(f"{folder} holds a '{found}' export, not a '{kind}'")
    return folder, cfg


def bundled_guide(path: str | Path) -> Path | None:
    """The guide model exported with the latent diffusion export at ``path`` (``<path>/guide``), if it has one."""
    path = Path(path)
    folder = path.parent if path.name == WEIGHTS else path
    guide = folder / GUIDE
    return guide if folder.is_dir() and (guide / CONFIG).is_file() else None


def load_pickle_safely(path: str | Path, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """The one way a torch pickle (``.ckpt``, ``.pt``, ``.bin``) is read here: ``weights_only=True``, so that a
    file which would run code when unpickled is refused, naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a refusal
        raise ValueError(f"refusing {what} file {path}: it does not load with weights_only=True, i.e. it holds "
                         f"more than tensors and plain containers and could run code when unpickled ({err}). "
                         "Convert it to safetensors where it was made, from a trusted source.") from err


def read_state_dict(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """Tensors of a weights file from outside: safetensors, or a torch pickle read by :func:`load_pickle_safely`.
    A Lightning/CompVis checkpoint's ``state_dict`` entry is returned when present."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {path} does not exist")
        return read_safetensors(path, what)
    state = load_pickle_safely(path, what)
    if not isinstance(state, dict):
        raise ValueError(f"{what} file {path} holds a {type(state).__name__}, expected a dict of tensors")
    return state.get("state_dict", state)


def read_safetensors(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` whose errors (truncated file, bad header...) name the file."""
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types; each is a bad file here
        raise ValueError(f"{what} file {path} is not a readable safetensors file ({err}); re-export or re-download "
                         "it") from err


def load_weights(model: nn.Module, weights: Path | dict[str, torch.Tensor], source: str | Path | None = None) -> None:
    """Load a state dict (or a safetensors file) strictly, naming missing and unexpected keys on mismatch."""
    state = read_safetensors(weights) if isinstance(weights, Path) else weights
    file = weights if isinstance(weights, Path) else source
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{file} does not match {type(model).__name__}: missing keys {result.missing_keys[:10]}"
                         f" ({len(result.missing_keys)} in all), unexpected keys {result.unexpected_keys[:10]} "
                         f"({len(result.unexpected_keys)} in all)")


def load_exported(path: str | Path, kind: str, expected: type[nn.Module], make_hint: str = "",
                  device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the network of an export folder, load its weights; frozen and in eval mode."""
    folder, cfg = read_export_config(path, kind, make_hint)
    model = instantiate_trusted(cfg["model"], folder / CONFIG)
    if not isinstance(model, expected):
        raise TypeError(f"{folder}/{CONFIG}: model is {type(model).__name__}, expected {expected.__name__}")
    load_weights(model, folder / WEIGHTS)
    return model.to(device).eval().requires_grad_(False)


def load_first_stage(path: str | Path, device: str | torch.device = "cpu") -> AutoencoderKL:
    """An exported first stage, latent statistics attached (``latent_mean``/``latent_std`` buffers).

    Its ``export_config`` attribute keeps the folder's config so it can be exported again as is.
    """
    model = load_exported(path, FIRST_STAGE, AutoencoderKL, "python train.py experiment=ae_f8", device)
    model.export_config = read_export_config(path, FIRST_STAGE)[1]
    return model


CLASSIFIER = "classifier"


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The exported Fashion-MNIST evaluator classifier."""
    return load_exported(path, CLASSIFIER, FashionClassifier, "python scripts/train_classifier.py", device)


LATENT_DIFFUSION = "latent_diffusion"
MAKE_LDM = "python train.py experiment=ldm_f8 (or another ldm_* experiment)"


def read_pipeline(path: str | Path, ema: bool = True) -> tuple[dict, AutoencoderKL, dict[str, torch.Tensor], Path]:
    """What a latent diffusion pipeline is built from, read from an export folder or a stage-2 Lightning
    checkpoint: (model config, the frozen first stage, U-Net + conditioner weights, the config's source file).

    A checkpoint gives its EMA weights (``ema=False``: the raw ones) and names its first stage's export."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}; train one with: {MAKE_LDM} (it is exported to exports/ldm_f8), "
                                "or point model_path= at an export folder or a .ckpt")
    if path.is_dir() or path.name == WEIGHTS:
        folder, cfg = read_export_config(path, LATENT_DIFFUSION, MAKE_LDM)
        return cfg["model"], load_first_stage(folder / FIRST_STAGE), read_safetensors(folder / WEIGHTS), folder / CONFIG
    if path.suffix != ".ckpt":
        raise FileNotFoundError(f"{path} is neither an exported model folder nor a .ckpt file; make one with: "
                                f"{MAKE_LDM}")
    ckpt = load_pickle_safely(path)
    run_cfg = ckpt.get("ldm_config") if isinstance(ckpt, dict) else None
    if not run_cfg:
        raise ValueError(f"{path} carries no ldm_config: not a checkpoint written by this framework's train.py")
    model_cfg = run_cfg["model"]
    target = model_cfg.get("_target_", "")
    if not target.endswith("LatentDiffusionStage"):
        kind = "an autoencoder (stage 1)" if target.endswith("AutoencoderStage") else f"a '{target}'"
        raise ValueError(f"{path} is {kind} checkpoint, not a latent diffusion (stage 2) one; "
                         f"sample from a checkpoint of `{MAKE_LDM}`")
    state = ckpt["state_dict"] if ema or "current_model_state" not in ckpt else ckpt["current_model_state"]
    if not ema and "current_model_state" not in ckpt:
        log.warning("%s holds no separate raw weights (trained without EMA); using its state_dict", path)
    weights = {k: v for k, v in state.items() if k.split(".")[0] in ("unet", "conditioner")}
    return model_cfg, load_first_stage(model_cfg["first_stage"]), weights, path


def export_pipeline(path: str | Path, bundle: nn.Module, model_config: dict, metadata: dict,
                    first_stage: AutoencoderKL, run_config: dict | None = None) -> Path:
    """One self-contained folder: U-Net + conditioner (``bundle``: ``unet.*``, ``conditioner.*``) with their config,
    and the first stage in ``first_stage/`` as it was exported."""
    fs_export = getattr(first_stage, "export_config", None)
    if fs_export is None:
        raise ValueError("exporting a pipeline needs a first stage loaded with ldm.checkpoints.load_first_stage")
    path = Path(path)
    export_folder(path, bundle, LATENT_DIFFUSION, model_config, metadata, run_config)
    export_folder(path / FIRST_STAGE, first_stage, FIRST_STAGE, fs_export["model"], fs_export["metadata"],
                  fs_export.get("run_config"))
    return path


class UNetAndConditioner(nn.Module):
    """U-Net and conditioner under one state dict (``unet.*``, ``conditioner.*``), as stage 2 and its exports hold
    them."""

    def __init__(self, unet: nn.Module, conditioner: nn.Module):
        super().__init__()
        self.unet, self.conditioner = unet, conditioner


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def checkpoint_mismatch(ckpt_path: str | Path, model: nn.Module, run_config: dict | None) -> str:
    """Why the Lightning checkpoint at ``ckpt_path`` does not load into ``model``, in one line: the first tensors
    whose shapes differ (or that one side lacks), the model settings its run config (``ldm_config``) has otherwise,
    and the way to start from its weights in another architecture (``model.init_from``)."""
    ckpt = load_pickle_safely(ckpt_path)
    theirs, ours = ckpt.get("state_dict", {}), model.state_dict()
    shapes = [f"{k} {list(theirs[k].shape)} there, {list(v.shape)} here" for k, v in ours.items()
              if k in theirs and theirs[k].shape != v.shape]
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    parts = shapes[:2] + [f"{k} only here" for k in missing[:1]] + [f"{k} only there" for k in unexpected[:1]]
    more = len(shapes) + len(missing) + len(unexpected) - len(parts)
    before = _flatten((ckpt.get("ldm_config") or {}).get("model") or {}, "model.")
    now = _flatten((run_config or {}).get("model") or {}, "model.")
    changed = [f"{k}={before.get(k)} there, {now.get(k)} here" for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k)]
    settings = (f"; its run config differs in {', '.join(changed[:4])}" + (f" (+{len(changed) - 4} more)"
                if len(changed) > 4 else "")) if changed else ""
    return (f"ckpt_path={ckpt_path}: the checkpoint does not fit this model: {'; '.join(parts)}"
            f"{f' (+{more} more tensors)' if more > 0 else ''}{settings}. Resume with the checkpoint's settings, or "
            f"start a new run from its weights in this architecture with model.init_from={ckpt_path} (it loads "
            "what matches)")
