"""The two classes a diffusers pipeline folder exported by ``python scripts/export_diffusers.py`` runs.

This file is copied into the exported folder (``pipeline.py`` and ``conditioner/conditioner.py``), where
``diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` imports it. The U-Net, the VAE
and the scheduler are plain diffusers classes; the conditioner is this framework's (an OpenCLIP text tower
trained with the model, or a class embedding), so loading needs this package installed.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import register_to_config
from PIL import Image


class FrameworkConditioner(ModelMixin, ConfigMixin):
    """This framework's ``Conditioner`` (text and/or class embedders), built from its config node."""

    @register_to_config
    def __init__(self, model_config: dict | None = None):
        super().__init__()
        from ldm.checkpoints import instantiate_trusted

        self.conditioner = instantiate_trusted(model_config or {}, "conditioner/config.json")

    @property
    def input_keys(self) -> list[str]:
        return self.conditioner.input_keys

    def forward(self, batch: dict) -> dict:
        return self.conditioner(batch)

    def uncond(self, batch_size: int, overrides: dict | None = None) -> dict:
        return self.conditioner.uncond(batch_size, overrides)


class FrameworkLDMPipeline(DiffusionPipeline):
    """Text- or class-to-image with classifier-free guidance; latents are de-normalised with the first stage's
    per-channel statistics (``latent_mean``, ``latent_std``) before the VAE decodes them."""

    def __init__(self, unet, vae, scheduler, conditioner, latent_mean: list[float] | None = None,
                 latent_std: list[float] | None = None, resolution: int = 64):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler, conditioner=conditioner)
        self.register_to_config(latent_mean=latent_mean, latent_std=latent_std, resolution=resolution)

    def _condition(self, prompt, class_labels, n: int) -> dict:
        batch = {}
        if "caption" in self.conditioner.input_keys:
            batch["caption"] = [prompt] * n if isinstance(prompt, str) else list(prompt)
        if "class_label" in self.conditioner.input_keys:
            labels = [class_labels] * n if isinstance(class_labels, int) else list(class_labels)
            batch["class_label"] = torch.tensor(labels, dtype=torch.long)
        return batch

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, class_labels: int | list[int] | None = None,
                 negative_prompt: str | list[str] | None = None, num_images: int = 1, num_inference_steps: int = 20,
                 guidance_scale: float = 5.0, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil",
                 guidance_interval: tuple[float, float] | None = (0.5, 3.0), guidance_rescale: float = 0.0):
        """``guidance_interval`` [sigma_lo, sigma_hi]: guidance only at the steps whose sigma = sqrt((1 - abar) / abar)
        lies in (lo, hi], the conditional half alone elsewhere; ``guidance_rescale``: CFG rescale's phi (both as in
        the framework's sampler; the defaults are ``ldm.diffusion.guidance``'s DEFAULT_CFG_SCALE and
        DEFAULT_INTERVAL)."""
        from ldm.diffusion.guidance import check_interval, check_rescale, combine, guides_at

        interval, phi = check_interval(guidance_interval), check_rescale(guidance_rescale)
        n = len(prompt) if isinstance(prompt, list) else len(class_labels) if isinstance(class_labels, list) \
            else num_images
        cond = self.conditioner(self._condition(prompt, class_labels, n))
        negatives = {"caption": [negative_prompt] * n if isinstance(negative_prompt, str) else negative_prompt} \
            if negative_prompt is not None else None
        uncond = self.conditioner.uncond(n, negatives)
        both = {k: None if cond[k] is None else torch.cat([uncond[k], cond[k]]) for k in cond}
        side = self.config.resolution // (2 ** (len(self.vae.config.block_out_channels) - 1))
        shape = (n, self.unet.config.in_channels, side, side)
        x = latents if latents is not None else torch.randn(shape, generator=generator)
        x = x.to(self.device) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            if guidance_scale != 1.0 and guides_at(float(self.scheduler.alphas_cumprod[int(t)]), interval):
                x_in = self.scheduler.scale_model_input(torch.cat([x, x]), t)
                out = self.unet(x_in, t, encoder_hidden_states=both["context"], class_labels=both["y"]).sample
                out = combine(*out.chunk(2), guidance_scale, phi)
            else:  # the conditional half alone
                x_in = self.scheduler.scale_model_input(x, t)
                out = self.unet(x_in, t, encoder_hidden_states=cond["context"], class_labels=cond["y"]).sample
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
        view = (1, -1, 1, 1)
        z = x * torch.tensor(self.config.latent_std, device=x.device).view(view) + \
            torch.tensor(self.config.latent_mean, device=x.device).view(view)
        images = self.vae.decode(z).sample.clamp(-1, 1)
        if output_type != "pil":
            return images
        arr = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]
