"""diffusers-format weights: our AutoencoderKL / UNet <-> diffusers' AutoencoderKL / UNet2DConditionModel.

Our networks use the CompVis key layout; diffusers renames blocks (``input_blocks.4.0`` ->
``down_blocks.1.resnets.0``) and stores the VAE's attention projections as linear instead of 1x1
conv weights. The renaming is a pure function of our key and the architecture, so one direction is
written and the other is its inverse over our model's keys. Configs are translated both ways;
features diffusers' classes cannot express (attention inside the VAE's levels, a GroupNorm that is
not 32 groups) are refused with a message.

    save_diffusers_folder(unet, "out/unet")        # a folder diffusers' UNet2DConditionModel.from_pretrained loads
    unet = unet_from_diffusers("sd/unet")          # a diffusers folder (config.json + weights)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ldm.checkpoints import read_state_dict
from ldm.networks.autoencoder import AutoencoderKL
from ldm.networks.unet import UNet

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _sub(rest: str, table: dict[str, str]) -> str:
    for ours, theirs in table.items():
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return rest


# ----- U-Net -----------------------------------------------------------------------------------------
def unet_key_to_diffusers(key: str, num_res_blocks: int) -> str:
    """``input_blocks.4.1.proj_in.weight`` -> ``down_blocks.1.attentions.0.proj_in.weight`` etc."""
    per_level = num_res_blocks + 1
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key):
        n, k, rest = int(m[1]), int(m[2]), m[3]
        if n == 0:
            return f"conv_in.{rest}"
        level, j = divmod(n - 1, per_level)
        if j == num_res_blocks:
            return f"down_blocks.{level}.downsamplers.0.conv.{rest.removeprefix('op.')}"
        return (f"down_blocks.{level}.resnets.{j}.{_sub(rest, _RESNET)}" if k == 0
                else f"down_blocks.{level}.attentions.{j}.{rest}")
    if m := re.fullmatch(r"middle_block\.(\d+)\.(.+)", key):
        k, rest = int(m[1]), m[2]
        return f"mid_block.attentions.0.{rest}" if k == 1 else f"mid_block.resnets.{k // 2}.{_sub(rest, _RESNET)}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key):
        n, k, rest = int(m[1]), int(m[2]), m[3]
        level, j = divmod(n, per_level)
        if k == 0:
            return f"up_blocks.{level}.resnets.{j}.{_sub(rest, _RESNET)}"
        if rest.startswith("conv."):
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        return f"up_blocks.{level}.attentions.{j}.{rest}"
    fixed = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb.0.0": "class_embedding.linear_1", "label_emb.0.2": "class_embedding.linear_2",
             "out.0": "conv_norm_out", "out.2": "conv_out"}
    return _sub(key, fixed)


def unet_diffusers_config(unet: UNet) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config of the same architecture."""
    a = unet.arch
    if a["model_channels"] % 32 or a["model_channels"] // 32 < 1:
        raise ValueError(f"diffusers' UNet uses 32-group GroupNorm: model_channels={a['model_channels']} must be a "
                         "multiple of 32")
    widths = [a["model_channels"] * m for m in a["channel_mult"]]
    heads = [w // a["num_head_channels"] if a["num_head_channels"] != -1 else a["num_heads"] for w in widths]
    attn = [2**i in a["attention_resolutions"] for i in range(len(widths))]
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": None, "in_channels": a["in_channels"],
        "out_channels": a["out_channels"] or a["in_channels"],
        "down_block_types": ["CrossAttnDownBlock2D" if x else "DownBlock2D" for x in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if x else "UpBlock2D" for x in reversed(attn)],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": widths,
        "layers_per_block": a["num_res_blocks"], "cross_attention_dim": a["context_dim"],
        "attention_head_dim": heads, "use_linear_projection": a["use_linear_in_transformer"],
        "transformer_layers_per_block": a["transformer_depth"], "flip_sin_to_cos": True, "freq_shift": 0,
        "norm_num_groups": 32, "act_fn": "silu",
        "class_embed_type": "projection" if a["adm_in_channels"] else None,
        "projection_class_embeddings_input_dim": a["adm_in_channels"],
    }


def unet_args_from_diffusers(config: dict[str, Any]) -> dict[str, Any]:
    """Our UNet's constructor arguments for a ``UNet2DConditionModel`` config (refusing what we cannot build)."""
    widths = list(config["block_out_channels"])
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"mid_block_type {config.get('mid_block_type')} is not supported")
    if config.get("class_embed_type") not in (None, "projection") or config.get("addition_embed_type"):
        raise ValueError("only class_embed_type=projection (a vector y) is supported among extra embeddings")
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = heads if isinstance(heads, list | tuple) else [heads] * len(widths)
    head_channels = {w // h for w, h in zip(widths, heads, strict=True)}
    if len(head_channels) != 1:
        raise ValueError(f"attention heads {heads} over widths {widths} give unequal head widths {head_channels}; "
                         "our UNet uses one head width throughout")
    down = config["down_block_types"]
    depth = config.get("transformer_layers_per_block", 1)
    if isinstance(depth, list | tuple):
        if len(set(depth)) != 1:
            raise ValueError(f"transformer_layers_per_block {depth} differs per level; not supported")
        depth = depth[0]
    return {
        "in_channels": config["in_channels"], "out_channels": config["out_channels"], "model_channels": base,
        "num_res_blocks": config["layers_per_block"], "channel_mult": [w // base for w in widths],
        "attention_resolutions": [2**i for i, t in enumerate(down) if t.startswith("CrossAttn")],
        "num_heads": -1, "num_head_channels": head_channels.pop(), "transformer_depth": depth,
        "context_dim": config.get("cross_attention_dim"),
        "adm_in_channels": config.get("projection_class_embeddings_input_dim"),
        "use_linear_in_transformer": config.get("use_linear_projection", False),
    }


# ----- autoencoder -----------------------------------------------------------------------------------
def vae_key_to_diffusers(key: str, num_levels: int) -> str:
    """``decoder.up.0.block.1.nin_shortcut.weight`` -> ``decoder.up_blocks.<n-1>.resnets.1.conv_shortcut.weight``."""
    if m := re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|downsample|upsample|attn)\.(.+)", key):
        part, direction, level, kind, rest = m[1], m[2], int(m[3]), m[4], m[5]
        if kind == "attn":
            raise ValueError("diffusers' AutoencoderKL has no attention inside the levels (attn_resolutions)")
        idx = level if direction == "down" else num_levels - 1 - level
        blocks = f"{part}.{direction}_blocks.{idx}"
        if kind == "block":
            j, res = rest.split(".", 1)
            return f"{blocks}.resnets.{j}.{_sub(res, {'nin_shortcut': 'conv_shortcut'})}"
        return f"{blocks}.{kind}rs.0.{rest}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)", key):
        part, kind, rest = m[1], m[2], m[3]
        if kind == "attn_1":
            return f"{part}.mid_block.attentions.0.{_sub(rest, _VAE_ATTN)}"
        return f"{part}.mid_block.resnets.{int(kind[-1]) - 1}.{_sub(rest, {'nin_shortcut': 'conv_shortcut'})}"
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)


def vae_diffusers_config(ae: AutoencoderKL) -> dict[str, Any]:
    a = ae.arch
    if a["attn_resolutions"]:
        raise ValueError("diffusers' AutoencoderKL has no attention inside the levels (attn_resolutions)")
    if a["z_channels"] != a["embed_dim"]:
        raise ValueError(f"diffusers' AutoencoderKL needs z_channels == embed_dim (got {a['z_channels']}, "
                         f"{a['embed_dim']})")
    widths = [a["ch"] * m for m in a["ch_mult"]]
    if any(w % 32 for w in widths):
        raise ValueError(f"diffusers' AutoencoderKL uses 32-group GroupNorm: widths {widths} must be multiples of 32")
    std = ae.latent_std.float()
    return {
        "_class_name": "AutoencoderKL", "in_channels": a["in_channels"], "out_channels": a["out_channels"],
        "down_block_types": ["DownEncoderBlock2D"] * len(widths), "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "block_out_channels": widths, "layers_per_block": a["num_res_blocks"], "latent_channels": a["z_channels"],
        "norm_num_groups": 32, "sample_size": a["resolution"], "act_fn": "silu",
        "mid_block_add_attention": a["mid_attn"],
        # diffusers scales latents by one global factor; ours may be per channel (their mean is used here).
        "scaling_factor": float(1.0 / std.mean()), "shift_factor": float(ae.latent_mean.float().mean()),
    }


def vae_args_from_diffusers(config: dict[str, Any]) -> dict[str, Any]:
    widths = list(config["block_out_channels"])
    if config.get("norm_num_groups", 32) != 32:
        raise ValueError(f"norm_num_groups={config.get('norm_num_groups')}: our autoencoder uses 32 groups")
    if any(t != "DownEncoderBlock2D" for t in config["down_block_types"]):
        raise ValueError(f"down_block_types {config['down_block_types']} are not all DownEncoderBlock2D")
    z = config["latent_channels"]
    return {"in_channels": config["in_channels"], "out_channels": config["out_channels"], "ch": widths[0],
            "ch_mult": [w // widths[0] for w in widths], "num_res_blocks": config["layers_per_block"],
            "attn_resolutions": [], "resolution": config.get("sample_size", 256), "z_channels": z, "embed_dim": z,
            "mid_attn": config.get("mid_block_add_attention", True)}


# ----- conversion of whole state dicts --------------------------------------------------------------------
def _rename(model: torch.nn.Module, to_theirs) -> dict[str, str]:
    """Our key -> their key for every parameter/buffer diffusers has (our latent statistics it has not)."""
    return {k: to_theirs(k) for k in model.state_dict() if not k.startswith("latent_")}


def _key_map(model: UNet | AutoencoderKL) -> dict[str, str]:
    if isinstance(model, UNet):
        return _rename(model, lambda k: unet_key_to_diffusers(k, model.arch["num_res_blocks"]))
    return _rename(model, lambda k: vae_key_to_diffusers(k, len(model.arch["ch_mult"])))


def to_diffusers_state(model: UNet | AutoencoderKL) -> dict[str, torch.Tensor]:
    """Our weights under diffusers' names and shapes (VAE attention projections as linear weights)."""
    state = model.state_dict()
    out = {}
    for ours, theirs in _key_map(model).items():
        t = state[ours]
        if ".mid_block.attentions." in theirs and t.dim() == 4:
            t = t[:, :, 0, 0]
        out[theirs] = t.detach().clone().contiguous()
    return out


def from_diffusers_state(model: UNet | AutoencoderKL, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers-named weights under our names and shapes, for the keys ``state`` has (no check)."""
    own = model.state_dict()
    return {ours: state[theirs].reshape(own[ours].shape) for ours, theirs in _key_map(model).items()
            if theirs in state and state[theirs].numel() == own[ours].numel()}


def read_diffusers_folder(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(config, weights, weights file) of a diffusers model folder (``unet/``, ``vae/``)."""
    return _read_folder(path)


def load_diffusers_state(model: UNet | AutoencoderKL, state: dict[str, torch.Tensor], source: str = "") -> None:
    """Load diffusers-named weights into ``model``; a clear error lists missing and unexpected keys."""
    key_map = _key_map(model)
    wanted = set(key_map.values())
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - wanted)
    if missing or unexpected:
        raise ValueError(f"{source or 'state dict'} does not match our {type(model).__name__} of this architecture: "
                         f"missing keys {missing[:8]} ({len(missing)} in all), unexpected keys {unexpected[:8]} "
                         f"({len(unexpected)} in all)")
    model.load_state_dict(from_diffusers_state(model, state), strict=False)


# ----- folders ------------------------------------------------------------------------------------------------
def save_diffusers_folder(model: UNet | AutoencoderKL, path: str | Path) -> Path:
    """``config.json`` + ``diffusion_pytorch_model.safetensors``, loadable by diffusers' ``from_pretrained``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = unet_diffusers_config(model) if isinstance(model, UNet) else vae_diffusers_config(model)
    save_file(to_diffusers_state(model), str(path / WEIGHTS))
    (path / CONFIG).write_text(json.dumps(config, indent=2))
    return path


def _read_folder(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"no diffusers model at {path} (expected {CONFIG} and {WEIGHTS})")
    config = json.loads((path / CONFIG).read_text())
    weights = path / WEIGHTS
    if not weights.is_file():
        bin_file = path / "diffusion_pytorch_model.bin"
        if not bin_file.is_file():
            raise FileNotFoundError(f"no weights in {path} (expected {WEIGHTS} or diffusion_pytorch_model.bin)")
        return config, read_state_dict(bin_file, "diffusers weights"), bin_file
    return config, load_file(str(weights)), weights


def unet_from_diffusers(path: str | Path) -> UNet:
    """Our UNet with the weights of a diffusers ``UNet2DConditionModel`` folder."""
    config, state, file = _read_folder(path)
    unet = UNet(**unet_args_from_diffusers(config))
    load_diffusers_state(unet, state, str(file))
    return unet


def vae_from_diffusers(path: str | Path) -> AutoencoderKL:
    """Our AutoencoderKL with the weights of a diffusers ``AutoencoderKL`` folder; its global
    ``scaling_factor``/``shift_factor`` become the latent statistics."""
    config, state, file = _read_folder(path)
    ae = AutoencoderKL(**vae_args_from_diffusers(config))
    load_diffusers_state(ae, state, str(file))
    ae.latent_std.fill_(1.0 / config.get("scaling_factor", 1.0))
    ae.latent_mean.fill_(config.get("shift_factor") or 0.0)
    return ae
