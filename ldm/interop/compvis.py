"""CompVis latent-diffusion / Stable Diffusion checkpoints into our networks.

Their single checkpoint holds every part under a prefix: ``first_stage_model.*`` (the KL
autoencoder), ``model.diffusion_model.*`` (the U-Net), ``model_ema.*`` (its EMA, with the dots
of each name removed, as CompVis' LitEma stores them) and ``cond_stage_model.*`` (the text
encoder; the OpenCLIP layout of Stable Diffusion 2 is supported). Our networks use the same
names, so loading is a prefix strip — checked strictly, with the missing and unexpected keys
named when the architecture does not match. Networks can be built from the run's CompVis yaml
(``model.params.unet_config`` / ``first_stage_config``), whose settings map onto our constructors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.checkpoints import read_state_dict
from ldm.networks.autoencoder import AutoencoderKL
from ldm.networks.unet import UNet

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."


def ema_key(key: str) -> str:
    """Our U-Net key -> CompVis LitEma's name for its average (dots removed)."""
    return EMA_PREFIX + ("diffusion_model." + key).replace(".", "")


def strict_load(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                ignore: tuple[str, ...] = ("latent_mean", "latent_std")) -> None:
    """``load_state_dict`` that names missing and unexpected keys and shape mismatches when they exist."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.startswith(ignore))
    unexpected = sorted(k for k in state if k not in own)
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{source} does not match our {type(model).__name__} of this architecture: missing keys "
                         f"{missing[:8]} ({len(missing)} in all), unexpected keys {unexpected[:8]} "
                         f"({len(unexpected)} in all), shape mismatches {shapes[:4]} ({len(shapes)} in all)")
    model.load_state_dict({k: v for k, v in state.items()}, strict=False)


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_compvis_unet(unet: UNet, state: dict[str, torch.Tensor], use_ema: bool = True, source: str = "") -> None:
    """The checkpoint's U-Net (its EMA weights when ``use_ema`` and present) into ``unet``."""
    weights = _sub_state(state, UNET_PREFIX)
    if not weights:
        raise ValueError(f"{source}: no '{UNET_PREFIX}*' keys: not a CompVis/Stable Diffusion checkpoint")
    if use_ema and any(k.startswith(EMA_PREFIX) for k in state):
        missing = [k for k in weights if ema_key(k) not in state]
        if missing:
            raise ValueError(f"{source}: EMA weights missing for {len(missing)} U-Net keys, e.g. {missing[:5]}; "
                             "load with use_ema=False")
        weights = {k: state[ema_key(k)] for k in weights}
    strict_load(unet, weights, f"{source} ({UNET_PREFIX}*)")


def load_compvis_first_stage(ae: AutoencoderKL, state: dict[str, torch.Tensor], source: str = "",
                             scale_factor: float | None = None) -> None:
    """The autoencoder of a full checkpoint (``first_stage_model.*``) or of a stage-1 checkpoint (no prefix;
    its ``loss.*`` discriminator/LPIPS weights are skipped). ``scale_factor`` (SD: 0.18215) becomes the
    latent statistics: std = 1/scale_factor for every channel, mean 0."""
    weights = _sub_state(state, FIRST_STAGE_PREFIX) or {k: v for k, v in state.items() if not k.startswith("loss.")}
    strict_load(ae, weights, f"{source} ({FIRST_STAGE_PREFIX}*)")
    if scale_factor is not None:
        ae.latent_mean.zero_()
        ae.latent_std.fill_(1.0 / scale_factor)


def unet_args_from_compvis(params: dict[str, Any]) -> dict[str, Any]:
    """CompVis ``unet_config.params`` -> our UNet's arguments (refusing settings we do not build)."""
    if params.get("use_spatial_transformer") is False and params.get("context_dim") is not None:
        raise ValueError("unet_config: context_dim without use_spatial_transformer is not supported")
    if params.get("num_classes") not in (None, "sequential"):
        raise ValueError(f"unet_config.num_classes={params['num_classes']}: class embeddings by index are not "
                         "supported (use a class embedder as the conditioner)")
    depth = params.get("transformer_depth", 1)
    if isinstance(depth, list | tuple):
        if len(set(depth)) != 1:
            raise ValueError(f"unet_config.transformer_depth={depth} differs per level; not supported")
        depth = depth[0]
    context = params.get("context_dim")
    return {"in_channels": params["in_channels"], "out_channels": params["out_channels"],
            "model_channels": params["model_channels"], "num_res_blocks": params["num_res_blocks"],
            "attention_resolutions": list(params["attention_resolutions"]),
            "channel_mult": list(params.get("channel_mult", (1, 2, 4, 8))),
            "num_heads": params.get("num_heads", -1), "num_head_channels": params.get("num_head_channels", -1),
            "transformer_depth": depth, "context_dim": context[0] if isinstance(context, list | tuple) else context,
            "adm_in_channels": params.get("adm_in_channels") if params.get("num_classes") == "sequential" else None,
            "use_linear_in_transformer": params.get("use_linear_in_transformer", False)}


def autoencoder_args_from_compvis(params: dict[str, Any]) -> dict[str, Any]:
    """CompVis ``first_stage_config.params`` (``embed_dim`` + ``ddconfig``) -> our AutoencoderKL's arguments."""
    dd = params["ddconfig"]
    return {"in_channels": dd["in_channels"], "out_channels": dd["out_ch"], "ch": dd["ch"],
            "ch_mult": list(dd["ch_mult"]), "num_res_blocks": dd["num_res_blocks"],
            "attn_resolutions": list(dd.get("attn_resolutions", [])), "resolution": dd["resolution"],
            "z_channels": dd["z_channels"], "embed_dim": params["embed_dim"], "dropout": dd.get("dropout", 0.0)}


def load_compvis_checkpoint(checkpoint: str | Path, config: str | Path | dict,
                            use_ema: bool = True) -> tuple[UNet, AutoencoderKL]:
    """A CompVis/SD checkpoint (``.ckpt`` loaded with weights_only, or ``.safetensors``) and its yaml config ->
    our (UNet, AutoencoderKL), the latter with the config's ``scale_factor`` as latent statistics."""
    cfg = OmegaConf.to_container(OmegaConf.load(config) if isinstance(config, str | Path) else OmegaConf.create(config),
                                 resolve=True)
    try:
        params = cfg["model"]["params"]
        unet_params, fs_params = params["unet_config"]["params"], params["first_stage_config"]["params"]
    except KeyError as err:
        raise ValueError(f"{config}: not a CompVis LatentDiffusion config "
                         f"(missing model.params.{err.args[0]})") from err
    state = read_state_dict(checkpoint, "CompVis checkpoint")
    unet = UNet(**unet_args_from_compvis(unet_params))
    load_compvis_unet(unet, state, use_ema, str(checkpoint))
    ae = AutoencoderKL(**autoencoder_args_from_compvis(fs_params))
    load_compvis_first_stage(ae, state, str(checkpoint), scale_factor=params.get("scale_factor", 1.0))
    return unet, ae
