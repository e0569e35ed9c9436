"""Sampling from a trained latent diffusion model: text/class-to-image, img2img, inpainting, CFG.

``LatentDiffusionPipeline.from_pretrained(path)`` takes an exported folder (``exports/ldm_f8``) or a
Lightning ``.ckpt`` of the latent diffusion stage (EMA weights by default). Calling it returns PIL images::

    pipe = LatentDiffusionPipeline.from_pretrained("exports/ldm_f8")
    images = pipe(prompt="a photo of a sneaker", num_images=4, seed=0)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoints import (
    UNetAndConditioner,
    bundled_guide,
    export_pipeline,
    instantiate_trusted,
    load_weights,
    read_pipeline,
)
from ldm.conditioning.conditioner import Conditioner
from ldm.data.decode import to_rgb
from ldm.diffusion.denoiser import AutoGuide, Denoiser, check_prediction_for
from ldm.diffusion.guidance import (
    DEFAULT_INTERVAL,
    check_autoguidance,
    check_interval,
    check_rescale,
    default_guidance,
)
from ldm.diffusion.levels import NoiseLevels, make_levels
from ldm.diffusion.samplers import check_sampler, sample
from ldm.diffusion.schedule import NoiseSchedule
from ldm.networks.autoencoder import AutoencoderKL
from ldm.networks.unet import UNet
from ldm.utils.checks import require_int
from ldm.utils.progress import Progress

log = logging.getLogger(__name__)
ImageInput = Image.Image | str | Path | torch.Tensor | np.ndarray


def read_image(image: ImageInput, key: str = "image") -> Image.Image | torch.Tensor:
    """A path, array or PIL image as a PIL image (a tensor is returned as is); errors name ``key`` and the file."""
    if isinstance(image, str | Path):
        if not Path(image).is_file():
            raise FileNotFoundError(f"{key}={image}: no such file")
        try:
            with Image.open(image) as opened:
                opened.load()
                return opened.copy()
        except (OSError, SyntaxError) as err:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"{key}={image}: not an image file PIL can read ({type(err).__name__}); expected a "
                             "PNG/JPEG/... image") from err
    return Image.fromarray(image) if isinstance(image, np.ndarray) else image


def image_size(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    """(width, height)."""
    return (image.shape[-1], image.shape[-2]) if isinstance(image, torch.Tensor) else image.size


def load_image(image: ImageInput, resolution: int, mode: str = "RGB", key: str = "image") -> torch.Tensor:
    """PIL/path/array/tensor -> (1, C, H, W) float in [-1, 1] (RGB) or [0, 1] (mask, mode ``L``), resized to
    ``resolution`` (bicubic; a tensor bilinearly)."""
    image = read_image(image, key)
    if isinstance(image, torch.Tensor):
        t = image.float()
        t = t[None] if t.dim() == 3 else t
        if t.shape[-1] != resolution or t.shape[-2] != resolution:
            t = F.interpolate(t, size=(resolution, resolution), mode="bilinear", align_corners=False)
        return t
    image = (to_rgb(image) if mode == "RGB" else image.convert(mode)).resize((resolution, resolution),
                                                                             Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.array(image, dtype=np.float32))
    arr = arr[None] if arr.dim() == 2 else arr.permute(2, 0, 1)
    return (arr / 255.0 if mode == "L" else arr / 127.5 - 1.0)[None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] BCHW -> list of RGB PIL images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return [Image.fromarray(a.cpu().numpy()) for a in arr]


class LatentDiffusionPipeline:
    """A U-Net, its Conditioner, the frozen first stage and the noise schedule, ready to sample."""

    def __init__(self, unet: UNet, conditioner: Conditioner, first_stage: AutoencoderKL, schedule: NoiseSchedule,
                 *, prediction: str = "eps", latent_norm: str = "channel", spacing: str = "trailing"):
        self.unet, self.conditioner, self.first_stage, self.schedule = unet, conditioner, first_stage, schedule
        self.prediction = check_prediction_for(prediction, schedule)
        self.latent_norm = latent_norm
        self.spacing = spacing
        self.config: dict[str, Any] = {}
        self.guide: LatentDiffusionPipeline | None = None  # autoguidance's guide model (set_guide)
        self.source = "in memory"  # the folder or .ckpt it was loaded from (from_pretrained)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device) -> LatentDiffusionPipeline:
        for m in (self.unet, self.conditioner, self.first_stage):
            m.to(device)
        if self.guide is not None:
            self.guide.to(device)
        return self

    # ----- loading and export (ldm.checkpoints reads and writes the files) ----------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", ema: bool = True,
                        guide: str | Path | None = "auto") -> LatentDiffusionPipeline:
        """An exported folder or a Lightning checkpoint of the latent diffusion stage; ``guide``: another one, the
        guide model of autoguidance (``set_guide``); "auto": the one exported with the model (``<path>/guide``,
        none if it has none); None: no guide."""
        model_cfg, first_stage, weights, source = read_pipeline(path, ema)
        pipe = cls._build(model_cfg, first_stage, source)
        load_weights(UNetAndConditioner(pipe.unet, pipe.conditioner), weights, source)
        pipe.source = str(path)
        pipe.to(device)
        for m in (pipe.unet, pipe.conditioner, pipe.first_stage):
            m.eval().requires_grad_(False)
        if guide == "auto":
            guide = bundled_guide(path)
        if guide is not None:
            if not Path(guide).exists():
                raise FileNotFoundError(f"guide_model={guide}: no guide model there; train one after the model with "
                                        "python train.py experiment=ldm_f8_guide (exported into the model's folder as "
                                        "guide/), or give an export folder or a .ckpt")
            pipe.set_guide(cls.from_pretrained(guide, device, ema, guide=None), f"guide_model={guide}")
        return pipe

    def set_guide(self, guide: LatentDiffusionPipeline | None, name: str = "guide_model") -> LatentDiffusionPipeline:
        """Autoguidance's guide (Karras et al. 2024): a weaker model of the same task (``experiment=ldm_f8_guide``).
        Refused unless it reads the same latents (first stage and normalisation), on the same noise schedule, from
        the same kind of condition; ``name`` is what the errors call it."""
        if guide is not None:
            expected = ("autoguidance needs a guide trained on the model's latents (python train.py "
                        "experiment=ldm_f8_guide model.first_stage=<the model's first stage>)")
            mine, theirs = self.first_stage.state_dict(), guide.first_stage.state_dict()
            if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k].to(mine[k].device))
                                                   for k in mine):
                raise ValueError(f"{name}: its first stage differs from the model's; {expected}")
            if guide.latent_norm != self.latent_norm:
                raise ValueError(f"{name}: latent_norm={guide.latent_norm}, the model's is "
                                 f"{self.latent_norm}; {expected}")
            a, b = self.schedule.alphas_cumprod, guide.schedule.alphas_cumprod
            if a.shape != b.shape or not torch.allclose(a.cpu(), b.cpu()):
                raise ValueError(f"{name}: its noise schedule differs from the model's (timestep t would "
                                 "mean another noise level); train the guide with the model's model.schedule")
            if guide.conditioner.input_keys != self.conditioner.input_keys:
                raise ValueError(f"{name}: conditioned on {guide.conditioner.input_keys}, the model on "
                                 f"{self.conditioner.input_keys}")
            guide.to(self.device)
        self.guide = guide
        return self

    @classmethod
    def _build(cls, model_cfg: dict, first_stage: AutoencoderKL, source: str | Path) -> LatentDiffusionPipeline:
        """The pipeline a (trusted-target-checked) model config from ``source`` describes."""
        unet = instantiate_trusted(model_cfg["unet"], source)
        conditioner = instantiate_trusted(model_cfg["conditioner"], source)
        schedule = instantiate_trusted(model_cfg["schedule"], source)
        pipe = cls(unet, conditioner, first_stage, schedule, prediction=model_cfg.get("prediction", "eps"),
                   latent_norm=model_cfg.get("latent_norm", "channel"), spacing=model_cfg.get("spacing", "trailing"))
        pipe.config = model_cfg
        return pipe

    def save_pretrained(self, path: str | Path, run_config: dict | None = None, metadata: dict | None = None) -> Path:
        """Export U-Net + conditioner (``model.safetensors``), their config, and the first stage in
        ``first_stage/``: one self-contained folder. ``metadata`` adds entries (e.g. training throughput)."""
        metadata = {"resolution": self.first_stage.resolution,
                    "downsampling_factor": self.first_stage.downsampling_factor,
                    "latent_channels": self.first_stage.embed_dim, "prediction": self.prediction,
                    "latent_norm": self.latent_norm} | (metadata or {})
        return export_pipeline(path, UNetAndConditioner(self.unet, self.conditioner), self.config, metadata,
                               self.first_stage, run_config)

    # ----- sampling -----------------------------------------------------------------------------
    def model_fn(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The U-Net's raw output (eps, v or x0, per ``prediction``) under a condition dict."""
        return self.unet(x, t, context=cond.get("context"), y=cond.get("y"))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.first_stage.encode(images.to(self.device)).mode()
        return self.first_stage.normalize_latents(z, self.latent_norm)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage.decode(self.first_stage.denormalize_latents(z, self.latent_norm)).clamp(-1, 1)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
                 class_labels: int | str | Sequence[int | str] | None = None, num_images: int | None = None,
                 sampler: str = "dpmpp_2m", steps: int = 20, cfg_scale: float | None = None, seed: int = 0,
                 init_image: ImageInput | None = None, strength: float = 0.8, mask: ImageInput | None = None,
                 eta: float | None = None, batch_size: int = 32, progress: bool = False,
                 output_type: str = "pil", guidance_interval: Sequence[float] | None = DEFAULT_INTERVAL,
                 guidance_rescale: float = 0.0, autoguidance: float | None = None) -> list[Image.Image] | torch.Tensor:
        """Generate ``num_images`` per prompt (or class label); returns PIL images or a [-1, 1] tensor.

        A class-conditional model given neither prompts nor labels samples every class. ``init_image`` +
        ``strength`` (0: the input's reconstruction, 1: ignore it) is img2img; adding ``mask`` (white = repaint,
        black = keep) is inpainting: the kept region is re-imposed from the noised original latent after every step
        and pasted back in pixel space at the end. ``negative_prompt`` replaces the empty prompt in the guidance's
        unconditional half. ``eta`` is for the samplers that take it (ddim, euler_a); others refuse it.
        ``guidance_interval`` [sigma_lo, sigma_hi] guides only the steps whose sigma = sqrt((1 - abar) / abar) lies
        in (lo, hi] (the others run the conditional half alone; None: every step); ``guidance_rescale`` is CFG
        rescale's phi. ``autoguidance`` w > 1 pushes every step away from the guide model's estimate (needs
        ``set_guide``). The defaults come from the guidance sweep (``ldm.diffusion.guidance``): cfg 5 in (0.5, 3]
        without a guide model, autoguidance 2.5 with cfg 3.5 in (0.5, 3] with one (``default_guidance``).
        """
        cfg_scale, autoguidance = default_guidance(self.guide is not None, cfg_scale, autoguidance)
        request = self.check_inputs(prompt, negative_prompt, class_labels, num_images, sampler, steps, cfg_scale,
                                    strength, eta, batch_size, output_type, init_image, mask, guidance_interval,
                                    guidance_rescale, autoguidance)
        levels = self.noise_levels(sampler, steps, strength if init_image is not None else 1.0)
        init = self.prepare_init(init_image, mask)
        options = {"eta": eta} if eta is not None else {}
        outputs = []
        batches = -(-request.n // batch_size)
        with Progress(batches * len(levels), f"sampling {request.n} images, {sampler} x {steps}", "step",
                      every_s=10, enabled=progress) as bar:
            for start in range(0, request.n, batch_size):
                idx = list(range(start, min(request.n, start + batch_size)))
                if init is not None and len(levels) == 0:  # strength 0: the input's reconstruction
                    outputs.append(self.decode(init.latent.expand(len(idx), -1, -1, -1)))
                    continue
                denoiser = self.encode_prompts(request, idx, cfg_scale, guidance_interval, guidance_rescale,
                                               autoguidance)
                x, noise = self.prepare_latents(idx, seed, levels, init)
                gen = torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + start)
                z = sample(sampler, denoiser, x, levels, generator=gen, callback=lambda *_: bar.update(),
                           after_step=self.inpainting_step(init, noise), **options)
                outputs.append(self.decode_images(z, init))
        images = torch.cat(outputs)
        return to_pil(images) if output_type == "pil" else images

    @staticmethod
    def check_arguments(sampler: str = "dpmpp_2m", steps: int = 20, cfg_scale: float | None = None,
                        eta: float | None = None,
                        num_images: int | None = None, batch_size: int = 32, strength: float = 0.8,
                        init_image: ImageInput | None = None, mask: ImageInput | None = None,
                        output_type: str = "pil", guidance_interval: Sequence[float] | None = DEFAULT_INTERVAL,
                        guidance_rescale: float = 0.0, autoguidance: float | None = None) -> None:
        """The checks that need no model (sample.py runs them before loading one); None: the default."""
        cfg_scale, autoguidance = default_guidance(False, cfg_scale, autoguidance)
        check_sampler(sampler, {"eta": eta} if eta is not None else {})
        check_interval(guidance_interval)
        check_rescale(guidance_rescale)
        check_autoguidance(autoguidance)
        require_int("steps", steps, 1)
        require_int("num_images", num_images, 1, optional=True)
        require_int("batch_size", batch_size, 1)
        if output_type not in ("pil", "tensor"):
            raise ValueError(f"output_type={output_type!r}: expected 'pil' or 'tensor'")
        if not isinstance(cfg_scale, int | float) or cfg_scale < 0:
            raise ValueError(f"cfg_scale={cfg_scale}: expected a number >= 0 (0: unconditional, 1: no guidance, "
                             "3-8 usual)")
        if init_image is not None and not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength}: expected a value in [0, 1] (0 keeps init_image, 1 ignores it)")
        if mask is not None and init_image is None:
            raise ValueError("mask=... (inpainting) needs init_image=... too")
        for key, value in (("init_image", init_image), ("mask", mask)):
            if isinstance(value, str | Path):
                read_image(value, key)

    def check_inputs(self, prompt, negative_prompt, class_labels, num_images, sampler, steps, cfg_scale, strength,
                     eta, batch_size, output_type, init_image, mask, guidance_interval=None,
                     guidance_rescale=0.0, autoguidance=1.0) -> _Request:
        """Every argument checked before any work; the per-image prompts/labels/negatives, expanded."""
        self.check_arguments(sampler, steps, cfg_scale, eta, num_images, batch_size, strength, init_image, mask,
                             output_type, guidance_interval, guidance_rescale, autoguidance)
        if autoguidance != 1.0 and self.guide is None:
            raise ValueError(f"autoguidance={autoguidance:g} needs a guide model: guide_model=PATH (sample.py) or "
                             "LatentDiffusionPipeline.from_pretrained(..., guide=PATH); train one with python "
                             "train.py experiment=ldm_f8_guide (it is exported into the model's folder as guide/)")
        keys = self.conditioner.input_keys
        if class_labels is not None and "class_label" not in keys:
            raise ValueError(f"class_labels given, but this model is conditioned on {keys}")
        if negative_prompt is not None and "caption" not in keys:
            raise ValueError("negative_prompt needs a text-conditioned model")
        prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
        labels = [class_labels] if isinstance(class_labels, int | str) else (
            list(class_labels) if class_labels is not None else None)
        if labels is not None and "class_label" in keys:  # names (the data's classes.json) -> indices
            embedder = next(e for e in self.conditioner.embedders if e.input_key == "class_label")
            labels = [embedder.label_of(label) for label in labels]
        if "caption" in keys and prompts is None:
            raise ValueError("this model is conditioned on text: pass prompt=...")
        if "class_label" in keys and labels is None and prompts is None:
            labels = list(range(self.num_classes()))  # every class
        if "class_label" in keys and labels is None:
            raise ValueError("this model is conditioned on class labels: pass class_labels=...")
        if prompts is not None and labels is not None and len(prompts) != len(labels):
            raise ValueError(f"{len(prompts)} prompts but {len(labels)} class labels")
        base = len(prompts) if prompts is not None else (len(labels) if labels is not None else 1)
        negatives = None
        if negative_prompt is not None:
            negatives = [negative_prompt] * base if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != base:
                raise ValueError(f"{len(negatives)} negative prompts for {base} prompts")
        for embedder in self.conditioner.embedders:  # each call with a prompt the text tower truncates says so
            if hasattr(embedder, "warn_truncated"):
                embedder.warn_truncated([*(prompts or []), *(negatives or [])])
        per = num_images or 1
        expand = (lambda xs: [x for x in xs for _ in range(per)] if xs is not None else None)
        return _Request(expand(prompts), expand(labels), expand(negatives), base * per)

    def num_classes(self) -> int:
        """The class count of the model's class embedder."""
        return next(e.num_classes for e in self.conditioner.embedders if e.input_key == "class_label")

    def noise_levels(self, sampler: str, steps: int, strength: float = 1.0) -> NoiseLevels:
        """The sampler's levels (its own spacing, e.g. Karras, or the model's); img2img keeps the last
        ``round(steps * strength)``."""
        _, spacing = check_sampler(sampler)
        levels = make_levels(self.schedule, steps, spacing or self.spacing)
        return levels.last(int(round(steps * strength))) if strength < 1.0 else levels

    def prepare_init(self, init_image: ImageInput | None, mask: ImageInput | None) -> _Init | None:
        """img2img/inpainting inputs: the image, its latent, and the repaint mask in pixels and latents.

        An image of another size than the model's is resized to it (logged); a mask must have the image's size."""
        if init_image is None:
            return None
        res = self.first_stage.resolution
        image = read_image(init_image, "init_image")
        if image_size(image) != (res, res):
            log.info("init_image: %dx%d resized to the model's %dx%d", *image_size(image), res, res)
        pixels = load_image(image, res, key="init_image").to(self.device)
        init = _Init(pixels, self.encode(pixels))
        if mask is not None:
            mask_image = read_image(mask, "mask")
            if image_size(mask_image) != image_size(image):
                raise ValueError(f"mask is {'x'.join(map(str, image_size(mask_image)))} but init_image is "
                                 f"{'x'.join(map(str, image_size(image)))}; give a mask of the image's size")
            init.pixel_mask = (load_image(mask_image, res, mode="L", key="mask").to(self.device) > 0.5).float()
            latent_side = self.first_stage.latent_shape(res)[1:]
            init.latent_mask = (F.adaptive_max_pool2d(init.pixel_mask, latent_side) > 0.5).float()
        return init

    def encode_prompts(self, request: _Request, idx: list[int], cfg_scale: float,
                       interval: Sequence[float] | None = None, rescale: float = 0.0,
                       autoguidance: float = 1.0) -> Denoiser:
        """The guided denoiser for images ``idx``: their condition, the null (or negative) one, and with
        ``autoguidance`` > 1 the guide model's own encoding of their condition."""
        batch: dict[str, Any] = {}
        if request.prompts is not None:
            batch["caption"] = [request.prompts[i] for i in idx]
        if request.labels is not None:
            batch["class_label"] = torch.tensor([request.labels[i] for i in idx], dtype=torch.long)
        if not batch:  # an unconditional model: its null condition
            batch["caption"] = [""] * len(idx)
        cond = self.conditioner(batch)
        negatives = {"caption": [request.negatives[i] for i in idx]} if request.negatives else None
        uncond = self.conditioner.uncond(len(idx), negatives)
        guide = None
        if autoguidance != 1.0 and self.guide is not None:
            guide = AutoGuide(self.guide.model_fn, self.guide.prediction, self.guide.conditioner(batch), autoguidance)
        return Denoiser(self.model_fn, self.prediction, self.schedule, cond, uncond, cfg_scale, interval, rescale,
                        guide)

    def prepare_latents(self, idx: list[int], seed: int, levels: NoiseLevels,
                        init: _Init | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x at the first level, the noise): image i's noise comes from seed + i, whatever the batching."""
        z_shape = self.first_stage.latent_shape(self.first_stage.resolution)
        noise = torch.stack([torch.randn(z_shape, generator=torch.Generator().manual_seed(seed + i))
                             for i in idx]).to(self.device)
        if init is None:
            return noise, noise
        a = levels.abar[0]
        return a**0.5 * init.latent + (1 - a) ** 0.5 * noise, noise

    def inpainting_step(self, init: _Init | None, noise: torch.Tensor) -> Callable | None:
        """After each step, the kept region is the original latent noised to the new level."""
        if init is None or init.latent_mask is None:
            return None

        def after_step(x: torch.Tensor, abar: float) -> torch.Tensor:
            known = abar**0.5 * init.latent + (1 - abar) ** 0.5 * noise
            return init.latent_mask * x + (1 - init.latent_mask) * known

        return after_step

    def decode_images(self, z: torch.Tensor, init: _Init | None) -> torch.Tensor:
        images = self.decode(z)
        if init is not None and init.pixel_mask is not None:
            images = init.pixel_mask * images + (1 - init.pixel_mask) * init.pixels
        return images


@dataclass
class _Request:
    """Checked inputs, one entry per image."""

    prompts: list[str] | None
    labels: list[int] | None
    negatives: list[str] | None
    n: int


@dataclass
class _Init:
    """img2img/inpainting inputs on the device."""

    pixels: torch.Tensor
    latent: torch.Tensor
    pixel_mask: torch.Tensor | None = None
    latent_mask: torch.Tensor | None = None
