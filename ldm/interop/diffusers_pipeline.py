"""Export a trained latent diffusion model as a diffusers pipeline folder.

    python scripts/export_diffusers.py exports/ldm_f8 out/ldm_f8_diffusers

writes ``model_index.json``, ``unet/`` (``UNet2DConditionModel``), ``vae/`` (``AutoencoderKL``), ``scheduler/``
(``DPMSolverMultistepScheduler`` on the model's noise schedule, prediction type and spacing), ``conditioner/``
(this framework's conditioner) and ``pipeline.py``. Load and sample it with diffusers::

    pipe = diffusers.DiffusionPipeline.from_pretrained("out/ldm_f8_diffusers", trust_remote_code=True)
    images = pipe(prompt=["a photo of a bag"], num_inference_steps=20, guidance_scale=4.0)

The latent normalisation is kept exactly: the pipeline de-normalises with the first stage's per-channel mean and
std (``latent_mean``, ``latent_std`` in ``model_index.json``), not with the VAE's single ``scaling_factor``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from ldm.checkpoints import UNetAndConditioner, instantiate_trusted, load_weights, read_pipeline
from ldm.interop.diffusers import save_diffusers_folder
from ldm.networks.autoencoder import AutoencoderKL

COMPONENTS = Path(__file__).with_name("diffusers_components.py")
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def scheduler_config(model_cfg: dict) -> dict:
    """DPM-Solver++(2M) on the model's schedule, as our ``dpmpp_2m`` sampler runs it."""
    sch = model_cfg["schedule"]
    return {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": sch["num_timesteps"],
            "beta_start": sch.get("beta_start", 0.00085), "beta_end": sch.get("beta_end", 0.012),
            "beta_schedule": BETA_SCHEDULES[sch.get("kind", "scaled_linear")],
            "prediction_type": PREDICTION_TYPES[model_cfg.get("prediction", "eps")],
            "timestep_spacing": model_cfg.get("spacing", "trailing"),
            "rescale_betas_zero_snr": bool(sch.get("zero_terminal_snr", False)),
            "algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"}


def latent_statistics(first_stage: AutoencoderKL, latent_norm: str) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) that undo the model's latent normalisation: z = x std + mean."""
    mean, std = first_stage._norm_stats(latent_norm, first_stage.latent_mean)
    return mean.flatten().tolist(), std.flatten().tolist()


def export_diffusers_pipeline(model_path: str | Path, out_dir: str | Path) -> Path:
    """Write the diffusers pipeline folder of an export folder or a stage-2 checkpoint (see the module doc)."""
    import diffusers

    model_cfg, first_stage, weights, source = read_pipeline(model_path)
    unet = instantiate_trusted(model_cfg["unet"], source)
    conditioner_cfg = model_cfg["conditioner"]
    conditioner = instantiate_trusted(conditioner_cfg, source)
    load_weights(UNetAndConditioner(unet, conditioner), weights, source)
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder (nothing is overwritten)")
    save_diffusers_folder(unet, out / "unet")
    save_diffusers_folder(first_stage, out / "vae")
    (out / "scheduler").mkdir(parents=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(model_cfg), indent=2))
    (out / "conditioner").mkdir()
    (out / "conditioner" / "config.json").write_text(json.dumps(
        {"_class_name": "FrameworkConditioner", "model_config": conditioner_cfg}, indent=2))
    save_file({f"conditioner.{k}": v.detach().contiguous() for k, v in conditioner.state_dict().items()},
              str(out / "conditioner" / "diffusion_pytorch_model.safetensors"))
    shutil.copyfile(COMPONENTS, out / "conditioner" / "conditioner.py")
    shutil.copyfile(COMPONENTS, out / "pipeline.py")
    mean, std = latent_statistics(first_stage, model_cfg.get("latent_norm", "channel"))
    index = {"_class_name": ["pipeline", "FrameworkLDMPipeline"], "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
             "conditioner": ["conditioner", "FrameworkConditioner"],
             "latent_mean": mean, "latent_std": std, "resolution": first_stage.resolution}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
