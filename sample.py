"""Sample from a trained model: ``python sample.py prompt="a photo of a sneaker" num_images=8``.

Writes ``grid.png`` (one row per prompt or class) and the single images to ``out_dir`` and prints the grid's
path. ``python sample.py --help`` lists every key (configs/sample.yaml).
"""

import logging
import re
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import ldm.utils.config  # noqa: F401  (resolvers)
from ldm.diffusion.guidance import default_guidance
from ldm.pipeline import LatentDiffusionPipeline, to_pil
from ldm.utils.entry import hydra_run_dir, run_or_report

log = logging.getLogger("sample")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "image"


def _value(node):
    return OmegaConf.to_object(node) if OmegaConf.is_config(node) else node


def sample(cfg: DictConfig) -> str:
    """Check every argument, load the model, sample, write the images and the grid; returns the grid's path."""
    interval = _value(cfg.guidance_interval)
    LatentDiffusionPipeline.check_arguments(cfg.sampler, cfg.steps, cfg.cfg_scale, cfg.eta, cfg.num_images,
                                            cfg.batch_size, cfg.strength, cfg.init_image, cfg.mask,
                                            guidance_interval=interval, guidance_rescale=cfg.guidance_rescale,
                                            autoguidance=cfg.autoguidance)
    if cfg.autoguidance not in (None, 1.0) and cfg.guide_model is None:
        raise ValueError(f"autoguidance={cfg.autoguidance:g} with guide_model=null: autoguidance needs a guide model "
                         "(guide_model=auto: the one exported with the model, or guide_model=PATH)")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = LatentDiffusionPipeline.from_pretrained(cfg.model_path, device=device, ema=cfg.ema, guide=cfg.guide_model)
    cfg_scale, autoguidance = default_guidance(pipe.guide is not None, cfg.cfg_scale, cfg.autoguidance)
    prompt, labels = _value(cfg.prompt), _value(cfg.class_labels)
    if "caption" not in pipe.conditioner.input_keys:
        prompt = None
    if labels is None and prompt is None and "class_label" in pipe.conditioner.input_keys:
        labels = list(range(pipe.num_classes()))  # every class, one grid row each
    images = pipe(prompt=prompt, negative_prompt=cfg.negative_prompt, class_labels=labels,
                  num_images=cfg.num_images, sampler=cfg.sampler, steps=cfg.steps, cfg_scale=cfg_scale,
                  seed=cfg.seed, init_image=cfg.init_image, strength=cfg.strength, mask=cfg.mask, eta=cfg.eta,
                  batch_size=cfg.batch_size, progress=True, output_type="tensor", guidance_interval=interval,
                  guidance_rescale=cfg.guidance_rescale, autoguidance=autoguidance)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = prompt if prompt is not None else labels
    names = [names] if isinstance(names, str | int) else list(names or ["sample"])
    for i, image in enumerate(to_pil(images)):
        image.save(out / f"{i:04d}_{_slug(str(names[i // cfg.num_images]))}.png")
    from torchvision.utils import make_grid  # here: a mistake in the arguments is reported without the import

    grid = make_grid(images.float().cpu(), nrow=cfg.num_images, padding=2, pad_value=1.0)
    grid_path = out / "grid.png"
    to_pil(grid[None])[0].save(grid_path)
    guide = f", autoguidance {autoguidance:g} by {pipe.guide.source}" if autoguidance != 1.0 else ""
    log.info("%d images from %s (%s, %d steps, cfg %g%s)", len(images), cfg.model_path, cfg.sampler, cfg.steps,
             cfg_scale, guide)
    print(f"sample grid: {grid_path}")
    return str(grid_path)


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> str:
    return run_or_report(lambda: sample(cfg), hydra_run_dir())


def experiment_as_key(argv: list[str]) -> list[str]:
    """``experiment=NAME`` names the training run to sample from; Hydra would read it as the training configs'
    experiment group, so it is passed on as ``sample_experiment=NAME``."""
    return [f"sample_experiment={a.split('=', 1)[1]}" if a.startswith("experiment=") else a for a in argv]


if __name__ == "__main__":
    sys.argv = experiment_as_key(sys.argv)
    main()
