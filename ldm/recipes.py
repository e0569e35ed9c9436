"""The paper recipes (``configs/experiment/<name>.yaml``): their published sizes, and their sizes as built here.

``recipe_size(name)`` composes a recipe, builds its networks on the meta device (no weights, no memory) and
counts parameters and FLOPs per image: what one training image costs (forward + backward of what trains,
forward of what is frozen), and what one sampling step and one decode cost. ``benchmarks/recipes.py`` turns
these into cost estimates (docs/recipes.md); ``tests/test_recipes.py`` checks the counts against ``PAPER``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch import nn

from ldm.networks.sizes import META, count_flops, meta_input, parameter_count
from ldm.utils.config import CONFIG_DIR, compose


@dataclass(frozen=True)
class Published:
    """A parameter count a source publishes for the network(s) a recipe builds."""

    params: float          # parameters (millions where the source rounds: 400e6)
    counts: str            # which of our networks it covers: "unet+conditioner", "unet", "autoencoder"
    source: str
    rounded_to: float      # the source's rounding (400M: 1e6 x a few): the check's tolerance


# Where a source gives a count. The LDM paper gives none for its autoencoders: the KL-f8 figure is Stable Diffusion's
# released VAE (the same architecture, counted from its checkpoint). The KL-f4 count is printed, not checked.
PAPER: dict[str, Published] = {
    "kl_f8_256": Published(83_653_863, "autoencoder", "Stable Diffusion's KL-f8 VAE checkpoint (= CompVis kl-f8)",
                           0),
    "cin256_ldm4": Published(400e6, "unet+conditioner", "LDM paper, Table 3 (LDM-4, N-params 400M)", 5e6),
    "cin256_ldm8": Published(395e6, "unet+conditioner", "LDM paper, Table 13 (LDM-8, model size 395M)", 5e6),
    "t2i256_openclip": Published(865_910_724, "unet", "Stable Diffusion 2 U-Net checkpoint (865,910,724)", 0),
    "t2i256_openclip_zsnr": Published(865_910_724, "unet", "Stable Diffusion 2 U-Net checkpoint (865,910,724)", 0),
}
RECIPES = ("kl_f8_256", "kl_f4_256", "cin256_ldm4", "cin256_ldm8", "t2i256_openclip", "t2i256_openclip_zsnr")


@dataclass
class RecipeSize:
    name: str
    resolution: int
    params: dict[str, int] = field(default_factory=dict)       # per network
    trainable: int = 0
    train_flops: dict[str, int] = field(default_factory=dict)  # per training image, per network
    sample_step_flops: int = 0     # one sampling step per image (with the unconditional half of CFG)
    decode_flops: int = 0          # decoding one latent to an image
    global_batch: int | None = None
    max_steps: int | None = None

    @property
    def train_flops_per_image(self) -> int:
        return sum(self.train_flops.values())

    def counted(self, which: str) -> int:
        return sum(self.params[n] for n in which.split("+"))


def build_on_meta(node: Any, **kwargs: Any) -> nn.Module:
    """Instantiate a Hydra node (``_target_``) with its parameters on the meta device: no memory, no weights."""
    with META:
        return instantiate(node, **kwargs)


def recipe_config(name: str, *overrides: str) -> DictConfig:
    """A recipe's config composed as a user's run would be (no data needed: the shards are a placeholder)."""
    if not (CONFIG_DIR / "experiment" / f"{name}.yaml").is_file():
        raise ValueError(f"no experiment '{name}' in {CONFIG_DIR / 'experiment'}")
    return compose([f"experiment={name}", "data.train_shards=/recipes/need/no/data", "trainer.accelerator=cpu",
                    *overrides])


def _first_stage_node(cfg: DictConfig) -> DictConfig:
    """The autoencoder node of the recipe that exports the first stage a stage-2 recipe reads."""
    name = Path(str(cfg.model.first_stage)).name
    return recipe_config(name).model.autoencoder


def _offline(conditioner: DictConfig) -> DictConfig:
    """The conditioner's node with pretrained weights left out (a size needs the architecture only)."""
    node = conditioner.copy()
    with open_dict(node):
        for embedder in node.embedders:
            if "pretrained" in embedder:
                embedder.pretrained = None
    return node


def recipe_size(name: str, *overrides: str) -> RecipeSize:
    cfg = recipe_config(name, *overrides)
    res = int(cfg.data.resolution)
    size = RecipeSize(name, res, max_steps=int(cfg.trainer.max_steps) if cfg.trainer.max_steps > 0 else None,
                      global_batch=cfg.get("global_batch"))
    ae_node = cfg.model.autoencoder if "autoencoder" in cfg.model else _first_stage_node(cfg)
    ae = build_on_meta(ae_node, resolution=res).eval()
    image = meta_input(1, 3, res, res)
    size.params["autoencoder"] = parameter_count(ae)
    if "autoencoder" in cfg.model:  # stage 1: autoencoder + discriminator (+ LPIPS's VGG16)
        disc = build_on_meta(cfg.model.loss.discriminator)
        size.params["discriminator"] = parameter_count(disc)
        size.trainable = size.params["autoencoder"] + size.params["discriminator"]
        size.train_flops["autoencoder"] = count_flops(lambda: ae(image)[0], backward=True)
        fake = meta_input(1, 3, res, res, grad=True)
        size.train_flops["discriminator"] = (count_flops(lambda: disc(fake), backward=True)
                                             + count_flops(lambda: disc(image)))
        if cfg.model.loss.perceptual_weight > 0:
            from torchvision.models import vgg16

            with META:
                vgg = vgg16().features
            size.train_flops["lpips_vgg16"] = (count_flops(lambda: vgg(fake), backward=True)
                                               + count_flops(lambda: vgg(image)))
        return size
    unet = build_on_meta(cfg.model.unet).eval()  # eval: no recomputation of checkpointed blocks in the count
    conditioner = build_on_meta(_offline(cfg.model.conditioner))
    size.params["unet"], size.params["conditioner"] = parameter_count(unet), parameter_count(conditioner)
    size.trainable = size.params["unet"] + parameter_count(conditioner, trainable_only=True)
    c, h, w = ae.latent_shape(res)
    z = meta_input(1, c, h, w)
    t = meta_input(1, dtype=torch.long)
    outputs: dict[str, list[torch.Tensor]] = {"context": [], "y": []}
    for i, embedder in enumerate(conditioner.embedders):
        def embed(e=embedder) -> torch.Tensor:  # one image's condition (a caption, a class label)
            if e.input_key == "caption":
                return e.encode(["a photograph"])
            emb = e.embedding(meta_input(1, dtype=torch.long))
            return emb[:, None] if e.output == "context" else emb

        trains = any(p.requires_grad for p in embedder.parameters())
        size.train_flops[f"conditioner.{i}"] = count_flops(embed, backward=trains)
        outputs[embedder.output].append(embed().detach())
    context = torch.cat(outputs["context"], dim=1) if outputs["context"] else None
    y = torch.cat(outputs["y"], dim=1) if outputs["y"] else None
    size.train_flops["unet"] = count_flops(lambda: unet(z, t, context, y), backward=True)
    size.train_flops["encoder"] = count_flops(lambda: ae.encode(image).mode())
    size.sample_step_flops = 2 * count_flops(lambda: unet(z, t, context, y))
    size.decode_flops = count_flops(lambda: ae.decode(z))
    return size
