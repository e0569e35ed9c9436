"""Guidance in a limited interval (Kynkäänniemi et al. 2024), CFG rescale (Lin et al. 2024) and autoguidance
(Karras et al. 2024), against the papers' definitions, through the Denoiser, the pipeline, sample.py and the
diffusers export."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion.denoiser import AutoGuide, Denoiser, denoised
from ldm.diffusion.guidance import check_interval, combine, guides_at, karras_sigma, rescale
from ldm.diffusion.schedule import NoiseSchedule
from ldm.training import build
from tests.conftest import ROOT
from tests.script_runner import run_script


def test_the_interval_is_open_below_and_closed_above_in_karras_sigma():
    assert karras_sigma(0.5) == pytest.approx(1.0) and karras_sigma(0.2) == pytest.approx(2.0)
    assert karras_sigma(0.0) == math.inf
    interval = (1.0, 2.0)  # sigma in (1, 2]
    assert not guides_at(0.5, interval)          # sigma = 1: the open end
    assert guides_at(0.2, interval)              # sigma = 2: the closed end
    assert guides_at(1 / (1 + 1.5**2), interval) and not guides_at(0.1, interval) and not guides_at(0.9, interval)
    assert guides_at(0.0, (0.5, math.inf)) and guides_at(0.7, None)
    assert check_interval([0.3, "inf"]) == (0.3, math.inf)
    for bad in ([2.0, 1.0], [-1, 1], [1], "wide"):
        with pytest.raises(ValueError, match="guidance_interval="):
            check_interval(bad)


def test_cfg_rescale_is_lin_et_al_eq_15_16_and_diffusers_guidance_rescale():
    gen = torch.Generator().manual_seed(0)
    f_u, f_c = torch.randn(3, 4, 8, 8, generator=gen), 2 * torch.randn(3, 4, 8, 8, generator=gen) + 0.3
    guided = f_u + 7.5 * (f_c - f_u)
    std = lambda a: a.std(dim=(1, 2, 3), keepdim=True)  # noqa: E731
    x_rescaled = guided * std(f_c) / std(guided)                       # eq. 15
    torch.testing.assert_close(combine(f_u, f_c, 7.5, 0.7), 0.7 * x_rescaled + 0.3 * guided)   # eq. 16
    torch.testing.assert_close(std(combine(f_u, f_c, 7.5, 1.0)), std(f_c))  # phi = 1: the conditional spread
    torch.testing.assert_close(combine(f_u, f_c, 7.5, 0.0), guided)
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    torch.testing.assert_close(rescale(guided, f_c, 0.7), rescale_noise_cfg(guided, f_c, guidance_rescale=0.7))


def test_outside_the_interval_the_denoiser_runs_the_conditional_half_alone():
    sch = NoiseSchedule("scaled_linear")
    batches = []

    def net(x, t, c):
        batches.append(len(x))
        return x * 0.5 + c["y"].view(-1, 1, 1, 1)

    cond, uncond = {"y": torch.ones(2, 1)}, {"y": torch.zeros(2, 1)}
    x = torch.randn(2, 4, 8, 8)
    inside, outside = 500, 20  # sigma ~ 1.6 and ~ 0.1
    den = Denoiser(net, "v", sch, cond, uncond, 3.0, interval=(0.5, 5.0))
    plain = Denoiser(net, "v", sch, cond, uncond, 3.0)
    alone = Denoiser(net, "v", sch, cond, None, 1.0)
    for t, expected, size in ((inside, plain, 4), (outside, alone, 2)):
        a = float(sch.alphas_cumprod[t])
        batches.clear()
        out = den(x, t, a)
        assert batches == [size]
        torch.testing.assert_close(out, expected(x, t, a))
    with pytest.raises(ValueError, match="guidance_rescale=1.5"):
        Denoiser(net, "v", sch, cond, uncond, 3.0, rescale=1.5)


def test_autoguidance_is_karras_eq_2_in_x0_space_for_any_guide_prediction():
    sch = NoiseSchedule("scaled_linear")
    main = lambda x, t, c: 0.3 * x + c["y"].view(-1, 1, 1, 1)  # noqa: E731 (eps)
    guide_calls = []

    def guide_net(x, t, c):  # v prediction, its own condition
        guide_calls.append(len(x))
        return -0.2 * x + c["y"].view(-1, 1, 1, 1)

    cond, uncond, gcond = {"y": torch.ones(2, 1)}, {"y": torch.zeros(2, 1)}, {"y": torch.full((2, 1), 0.5)}
    x, t = torch.randn(2, 4, 8, 8), 400
    a = float(sch.alphas_cumprod[t])
    d_c, d_u = denoised("eps", x, main(x, None, cond), a), denoised("eps", x, main(x, None, uncond), a)
    d_g = denoised("v", x, guide_net(x, None, gcond), a)
    ag = Denoiser(main, "eps", sch, cond, uncond, 1.0, guide=AutoGuide(guide_net, "v", gcond, 2.5))
    torch.testing.assert_close(ag(x, t, a), d_g + 2.5 * (d_c - d_g))  # eq. 2: D_g + w (D_c - D_g)
    both = Denoiser(main, "eps", sch, cond, uncond, 3.0, guide=AutoGuide(guide_net, "v", gcond, 2.0))
    torch.testing.assert_close(both(x, t, a), d_u + 3.0 * (d_c - d_u) + (d_c - d_g))
    guide_calls.clear()
    off = Denoiser(main, "eps", sch, cond, uncond, 3.0, guide=AutoGuide(guide_net, "v", gcond, 1.0))
    torch.testing.assert_close(off(x, t, a), d_u + 3.0 * (d_c - d_u))
    assert guide_calls == []  # weight 1: the guide is never run
    with pytest.raises(ValueError, match="autoguidance=0.5: expected a number in"):
        Denoiser(main, "eps", sch, cond, uncond, guide=AutoGuide(guide_net, "v", gcond, 0.5))


def test_pipeline_autoguidance_needs_a_guide_of_the_same_latents(make_ldm_cfg):
    torch.manual_seed(0)
    cfg = make_ldm_cfg("ldm_f8", "model/conditioner=class")
    pipe, guide = (build(cfg.model).eval().pipeline() for _ in range(2))
    with torch.no_grad():
        for p in [*pipe.unet.parameters(), *guide.unet.parameters()]:  # outputs that differ (out is zero-initialised)
            p.add_(torch.randn_like(p) * 0.05)
    common = {"class_labels": [1, 2], "steps": 3, "cfg_scale": 2.0, "seed": 1, "output_type": "tensor"}
    with pytest.raises(ValueError, match="autoguidance=2 needs a guide model: guide_model=PATH"):
        pipe(**common, autoguidance=2.0)
    plain = pipe(**common)
    pipe.set_guide(guide)
    torch.testing.assert_close(pipe(**common, autoguidance=1.0), plain)  # autoguidance 1: the guide is unused
    guided = pipe(**common, autoguidance=2.0)
    assert not torch.allclose(guided, plain)
    itself = pipe.__class__(pipe.unet, pipe.conditioner, pipe.first_stage, pipe.schedule, prediction=pipe.prediction,
                            latent_norm=pipe.latent_norm)
    pipe.set_guide(itself)  # the model as its own guide: D_c - D_guide = 0
    torch.testing.assert_close(pipe(**common, autoguidance=2.0), plain)
    with torch.no_grad():
        next(guide.first_stage.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="guide_model=other: its first stage differs from the model's"):
        pipe.set_guide(guide, "guide_model=other")


def _perturbed_stage(cfg, scale: float = 0.05):
    stage = build(cfg.model).eval()
    with torch.no_grad():
        for p in stage.unet.parameters():  # outputs that depend on the condition (out is zero-initialised)
            p.add_(torch.randn_like(p) * scale)
    return stage


def _export(stage, cfg, path):
    from omegaconf import OmegaConf

    pipe = stage.pipeline()
    pipe.config = OmegaConf.to_container(cfg.model, resolve=True)  # as ExportPipeline sets it
    pipe.save_pretrained(path)


def test_an_export_carries_its_guide_and_samples_with_it_by_default(make_ldm_cfg, tmp_path):
    from ldm.callbacks.export import ExportPipeline
    from ldm.pipeline import LatentDiffusionPipeline

    torch.manual_seed(0)
    cfg = make_ldm_cfg("ldm_f8", "model/conditioner=class")
    model, guide = _perturbed_stage(cfg), _perturbed_stage(cfg, 0.1)
    folder = tmp_path / "ldm_f8"
    # The guide's run checks, before its first step, that the model it will be exported into exists ...
    callback = ExportPipeline(str(tmp_path / "unused"), guide_of=str(folder))
    assert callback.dirpath == folder / "guide"
    trainer = type("Trainer", (), {"fast_dev_run": False})()
    with pytest.raises(ValueError, match=f"guide_of={folder}: no model at {folder}.*train the model first"):
        callback.on_fit_start(trainer, guide)
    _export(model, cfg, folder)
    callback.on_fit_start(trainer, guide)  # ... and reads the same latents
    _export(guide, cfg, folder / "guide")

    pipe = LatentDiffusionPipeline.from_pretrained(folder)  # guide="auto": the folder's guide/
    assert pipe.guide is not None and pipe.guide.source == str(folder / "guide")
    common = {"class_labels": [1, 2], "steps": 3, "seed": 1, "output_type": "tensor"}
    defaults = pipe(**common)
    torch.testing.assert_close(defaults, pipe(**common, cfg_scale=3.5, autoguidance=2.5))
    assert not torch.allclose(defaults, pipe(**common, cfg_scale=3.5, autoguidance=1.0))
    alone = LatentDiffusionPipeline.from_pretrained(folder, guide=None)
    assert alone.guide is None
    with pytest.raises(FileNotFoundError, match=f"guide_model={tmp_path / 'nowhere'}: no guide model there"):
        LatentDiffusionPipeline.from_pretrained(folder, guide=tmp_path / "nowhere")
    torch.testing.assert_close(alone(**common), alone(**common, cfg_scale=5.0, autoguidance=1.0))
    torch.testing.assert_close(alone(**common, cfg_scale=3.5), pipe(**common, autoguidance=1.0))

    # A guide of other latents is refused when the model loads, and before its run trains.
    with torch.no_grad():
        next(guide.first_stage.parameters()).add_(1.0)
    with pytest.raises(ValueError, match=f"guide_of={folder} .the guide this run trains.: its first stage differs"):
        callback.on_fit_start(trainer, guide)
    _export(model, cfg, tmp_path / "other")
    _export(guide, cfg, tmp_path / "other" / "guide")
    with pytest.raises(ValueError, match="guide_model=.*other/guide: its first stage differs from the model's"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "other")


def test_pipeline_interval_limits_guidance_and_saves_the_unconditional_half(make_ldm_cfg):
    torch.manual_seed(0)
    stage = build(make_ldm_cfg("ldm_f8", "model/conditioner=class").model).eval()  # no conditioning dropout
    with torch.no_grad():
        for p in stage.unet.parameters():  # an output that depends on the condition (out is zero-initialised)
            p.add_(torch.randn_like(p) * 0.05)
    pipe = stage.pipeline()
    sizes = []
    hook = pipe.unet.register_forward_hook(lambda m, args, out: sizes.append(len(args[0])))
    common = {"class_labels": [1, 2], "steps": 4, "cfg_scale": 4.0, "seed": 1, "output_type": "tensor"}
    full = pipe(**common, guidance_interval=None)  # every step
    assert sizes == [4] * 4
    sizes.clear()
    everywhere = pipe(**common, guidance_interval=[0.0, math.inf])
    torch.testing.assert_close(everywhere, full)
    nowhere = pipe(**common, guidance_interval=[100.0, 200.0])  # no level that high: conditional only
    torch.testing.assert_close(nowhere, pipe(**(common | {"cfg_scale": 1.0})))
    sizes.clear()
    levels = pipe.noise_levels("dpmpp_2m", 4)
    sigmas = [karras_sigma(float(a)) for a in levels.abar[:-1]]  # the levels the denoiser is called at
    some = pipe(**common, guidance_interval=[0.5, 5.0])
    assert sizes == [4 if 0.5 < s <= 5.0 else 2 for s in sigmas] and 2 in sizes and 4 in sizes, (sizes, sigmas)
    assert not torch.allclose(some, full) and not torch.allclose(some, nowhere)
    rescaled = pipe(**common, guidance_interval=None, guidance_rescale=0.7)
    assert not torch.allclose(rescaled, full)
    hook.remove()


def test_sample_py_takes_the_interval_and_refuses_a_bad_one_in_one_line(tmp_path):
    res = run_script(ROOT / "sample.py", "model_path=/nowhere", "guidance_interval=[5,1]", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "guidance_interval=[5, 1]: expected 0 <= sigma_lo < sigma_hi" in res.stderr
    res = run_script(ROOT / "sample.py", "model_path=/nowhere", "guidance_rescale=2", cwd=tmp_path)
    assert res.returncode == 2 and "guidance_rescale=2: expected a number in [0, 1]" in res.stderr
    res = run_script(ROOT / "sample.py", "model_path=/nowhere", "autoguidance=2.5", "guide_model=null", cwd=tmp_path)
    assert res.returncode == 2 and "autoguidance=2.5 with guide_model=null: autoguidance needs a guide" in res.stderr


def test_the_defaults_agree_everywhere_they_are_written():
    import inspect

    from ldm.diffusion.guidance import DEFAULT_CFG_SCALE, DEFAULT_INTERVAL, default_guidance
    from ldm.interop.diffusers_components import FrameworkLDMPipeline
    from ldm.pipeline import LatentDiffusionPipeline
    from ldm.utils.config import compose

    ours = inspect.signature(LatentDiffusionPipeline.__call__).parameters
    exported = inspect.signature(FrameworkLDMPipeline.__call__).parameters
    sample = compose([], config_name="sample")
    # None everywhere: the defaults for a model without a guide (cfg 5), or with one (autoguidance 2.5, cfg 3.5).
    assert ours["cfg_scale"].default is ours["autoguidance"].default is sample.cfg_scale is sample.autoguidance is None
    assert sample.guide_model == "auto" and ours["guidance_rescale"].default == sample.guidance_rescale == 0.0
    assert default_guidance(False) == (exported["guidance_scale"].default, 1.0) == (DEFAULT_CFG_SCALE, 1.0)
    assert default_guidance(True) == (3.5, 2.5) and default_guidance(True, 2.0, 1.0) == (2.0, 1.0)
    assert tuple(ours["guidance_interval"].default) == tuple(exported["guidance_interval"].default) == DEFAULT_INTERVAL
    grids = compose(["experiment=ldm_f8"]).model.sampling
    assert grids.cfg_scale == DEFAULT_CFG_SCALE  # the training-time grids have no guide
    for cfg in (sample, grids):
        assert tuple(cfg.guidance_interval) == DEFAULT_INTERVAL
