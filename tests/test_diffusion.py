"""Diffusion math against closed forms and against diffusers' schedulers as an oracle."""

import math

import pytest
import torch

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.guidance import cfg
from ldm.diffusion.levels import TERMINAL_ABAR, karras_levels, make_levels, make_timesteps
from ldm.diffusion.objectives import min_snr_weight, training_target, x0_from_eps, x0_from_v
from ldm.diffusion.samplers import SAMPLERS, check_sampler, sample
from ldm.diffusion.schedule import NoiseSchedule, make_betas


def test_schedules_closed_forms():
    lin = make_betas("linear", 1000, 1e-4, 0.02)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    sl = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert sl.sqrt()[0].item() == pytest.approx(0.00085**0.5) and sl[-1].item() == pytest.approx(0.012)
    assert torch.allclose(sl.sqrt().diff(), sl.sqrt().diff()[0].expand(999), atol=1e-12)
    cos = NoiseSchedule("cosine", 1000)
    t = torch.tensor([0, 500, 999])
    s = 0.008
    f = lambda k: math.cos((k / 1000 + s) / (1 + s) * math.pi / 2) ** 2
    expected = torch.tensor([f(k + 1) / f(0) for k in t.tolist()], dtype=torch.float64)
    assert torch.allclose(cos.alphas_cumprod[t][:2], expected[:2], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        NoiseSchedule("quadratic")


def test_zero_terminal_snr_rescaling():
    plain, zsnr = NoiseSchedule("scaled_linear"), NoiseSchedule("scaled_linear", zero_terminal_snr=True)
    assert zsnr.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert zsnr.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-9)
    assert (zsnr.alphas_cumprod.diff() <= 0).all()
    assert zsnr.snr(torch.tensor([999])).item() == 0.0


def test_q_sample_at_t0_is_identity_within_abar0():
    sch = NoiseSchedule("scaled_linear")
    x, n = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    out = sch.q_sample(x, torch.zeros(4, dtype=torch.long), n)
    a0 = sch.alphas_cumprod[0].item()
    bound = (1 - a0**0.5) * x.abs() + (1 - a0) ** 0.5 * n.abs()
    assert ((out - x).abs() <= bound + 1e-5).all()
    assert (out - x).abs().max() < 0.15  # sqrt(1 - abar_0) = 0.029 times |noise| < 5
    t = torch.tensor([999] * 4)
    torch.testing.assert_close(sch.q_sample(x, t, n), sch.alphas_cumprod[999].sqrt().float() * x
                               + (1 - sch.alphas_cumprod[999]).sqrt().float() * n)


def test_parameterisation_round_trips():
    sch = NoiseSchedule("cosine")
    x0, eps = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([10, 500, 990])
    alpha, sigma = sch.alpha_sigma(t, x0)
    x_t = alpha * x0 + sigma * eps
    v = training_target("v", x0, eps, alpha, sigma)
    torch.testing.assert_close(x0_from_v(x_t, v, alpha, sigma), x0)
    torch.testing.assert_close(x0_from_eps(x_t, eps, alpha, sigma), x0)
    assert training_target("eps", x0, eps, alpha, sigma) is eps
    assert training_target("x0", x0, eps, alpha, sigma) is x0
    for prediction, out in (("eps", eps), ("v", v), ("x0", x0)):  # every parameterisation -> the same D
        den = Denoiser(lambda *_: None, prediction, sch)
        for i in range(3):
            a = float(sch.alphas_cumprod[t[i]])
            torch.testing.assert_close(den.to_denoised(x_t[i], out[i], a), x0[i])


def test_min_snr_weights():
    snr = torch.tensor([0.5, 5.0, 20.0])
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "eps"), torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))
    torch.testing.assert_close(min_snr_weight(snr, None, "eps"), torch.ones(3))


def test_timestep_spacings_match_diffusers():
    from diffusers import DDIMScheduler

    for spacing in ("trailing", "leading", "linspace"):
        for steps in (10, 20, 50):
            ref = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
            ref.set_timesteps(steps)
            assert make_timesteps(1000, steps, spacing).tolist() == ref.timesteps.tolist(), (spacing, steps)
    with pytest.raises(ValueError, match="steps=0"):
        make_timesteps(1000, 0)


# ---- Gaussian data: the optimal denoiser is known, so samplers must return N(mu, s^2) ----------------
MU, S = 0.7, 0.5


SCALED_LINEAR = NoiseSchedule("scaled_linear")


def _gaussian_network(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """E[eps | x_t] for x0 ~ N(MU, S^2): sqrt(1-a)(x_t - sqrt(a) MU) / (a S^2 + 1 - a), an eps 'network'."""
    a = SCALED_LINEAR.alphas_cumprod[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)


def _x_T(sch: NoiseSchedule, n: int) -> torch.Tensor:
    """Draws from the exact marginal at t = T-1, so what remains is the sampler's own error."""
    a_top = sch.alphas_cumprod[-1].item()
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x * (a_top * S**2 + 1 - a_top) ** 0.5 + a_top**0.5 * MU


@pytest.mark.parametrize("name,steps", [("ddim", 250), ("dpmpp_2m", 250), ("ddpm", 1000), ("euler_a", 1000),
                                        ("dpmpp_2m_karras", 100)])
def test_samplers_reproduce_gaussian_mean_and_std(name, steps):
    """Tolerances: with N = 100k samples the standard errors are S/sqrt(N) = 0.0016 (mean) and
    S/sqrt(2N) = 0.0011 (std). Discretisation adds a bias that shrinks with the step count: the
    measured relative std errors are 0.8% (DDIM, 250 linspace steps), 0.6% (DPM-Solver++ 2M, 250),
    1.0% (DDPM, 1000; its plug-in posterior omits Var[x0 | x_t]), 1.1% (Euler ancestral, 1000: first order,
    3.0% at 250). We allow 0.01 on the mean
    (6 standard errors) and 1.5% on the std; the convergence test below shows the bias vanishing.
    """
    sch = NoiseSchedule("scaled_linear")
    _, spacing = check_sampler(name)
    out = sample(name, Denoiser(_gaussian_network, "eps", sch), _x_T(sch, 100_000),
                 make_levels(sch, steps, spacing or "linspace"), generator=torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - MU) < 0.01
    assert abs(out.std().item() / S - 1) < 0.015


def test_deterministic_samplers_converge_with_steps():
    """DDIM and DPM-Solver++ are ODE solvers: their std error must shrink as steps grow."""
    sch = NoiseSchedule("scaled_linear")
    x_T = _x_T(sch, 20_000)
    for name in ("ddim", "dpmpp_2m", "dpmpp_2m_karras"):
        _, spacing = check_sampler(name)
        errs = [abs(sample(name, Denoiser(_gaussian_network, "eps", sch), x_T,
                           make_levels(sch, n, spacing or "linspace")).std().item() - S) for n in (10, 40, 160)]
        assert errs[0] > errs[1] > errs[2], (name, errs)


# ---- against diffusers' schedulers on fixed inputs ------------------------------------------------------
def _net(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """A fixed nonlinear 'network' shared with the oracle."""
    w = torch.linspace(-1, 1, x[0].numel(), dtype=x.dtype).view(x.shape[1:])
    return torch.tanh(x * 0.8 + w) * (t.to(x.dtype).view(-1, 1, 1, 1) / 1000 + 0.2)


def _diffusers(name: str, prediction: str, zsnr: bool):
    """The diffusers scheduler each of our samplers reproduces, on the scaled-linear schedule, trailing spacing."""
    import diffusers

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  timestep_spacing="trailing", rescale_betas_zero_snr=zsnr,
                  prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction])
    if name in ("ddim", "ddim_eta1"):
        # Upcast to float64: in float32, DDIM with eta > 0 from abar_T = 0 takes the square root of
        # 1 - abar_s - std^2 rounded below zero and returns NaN (ours clamps that term at 0).
        ddim = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **common)
        ddim.alphas_cumprod = ddim.alphas_cumprod.double()
        return ddim
    if name == "ddpm":
        return diffusers.DDPMScheduler(clip_sample=False, variance_type="fixed_small", **common)
    if name == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler(**common)
    return diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                 use_karras_sigmas=name == "dpmpp_2m_karras", **common)


def _run_diffusers(scheduler, x: torch.Tensor, steps: int, seed: int, **step_options) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    if hasattr(scheduler, "sigmas") and scheduler.init_noise_sigma != 1.0:  # sigma-space: x_VE = x_VP / alpha
        x = x * (1 + scheduler.sigmas[0].double() ** 2) ** 0.5
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = _net(x_in, torch.full((x.shape[0],), float(t), dtype=torch.float64))
        x = scheduler.step(out, t, x, generator=gen, **step_options).prev_sample
    return x


ORACLE_CASES = ["ddim", "ddim_eta1", "ddpm", "dpmpp_2m", "dpmpp_2m_karras", "euler_a"]


@pytest.mark.parametrize("zsnr", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("case", ORACLE_CASES)
def test_samplers_match_diffusers(case, prediction, zsnr):
    """Every sampler x {eps, v} x {zero terminal SNR off, on} against its diffusers scheduler, 10 trailing steps,
    the same network and noise. Tolerance: 1e-4 relative to the output's scale (diffusers keeps its schedule in
    float32). diffusers' sigma-space schedulers (DPM-Solver++, Euler-a) replace abar_T = 0 by 2^-24; they are
    compared on that grid, and our exact-zero walk is checked against it separately below.
    eps prediction at abar = 0 is refused by our Denoiser (x0 is undefined there) instead of returning NaN."""
    name, options = ("ddim", {"eta": 1.0}) if case == "ddim_eta1" else (case, {})
    steps = 10
    sch = NoiseSchedule("scaled_linear", zero_terminal_snr=zsnr)
    if zsnr and prediction == "eps":
        with pytest.raises(ValueError, match="prediction=eps with a zero-terminal-SNR schedule"):
            Denoiser(_net, "eps", sch)
    if zsnr and name in ("dpmpp_2m", "dpmpp_2m_karras", "euler_a"):
        sch.alphas_cumprod[-1] = TERMINAL_ABAR  # diffusers' grid for its sigma-space schedulers
    elif zsnr and prediction == "eps":
        return  # DDIM/DDPM at abar = 0 with eps: refused above (diffusers returns non-finite samples)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, spacing = check_sampler(name)
    ours = sample(name, Denoiser(_net, prediction, sch), x, make_levels(sch, steps, spacing or "trailing"),
                  generator=torch.Generator().manual_seed(7), **options)
    ref = _run_diffusers(_diffusers(case, prediction, zsnr), x.clone(), steps, 7, **options)
    assert torch.isfinite(ours).all()
    scale = max(1.0, ref.abs().max().item())
    assert (ours - ref).abs().max().item() <= 1e-4 * scale, (ours - ref).abs().max().item()


def test_karras_levels_are_diffusers_timesteps():
    from diffusers import DPMSolverMultistepScheduler

    for zsnr in (False, True):
        ref = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                          use_karras_sigmas=True,
                                          rescale_betas_zero_snr=zsnr)
        ref.set_timesteps(15)
        levels = karras_levels(NoiseSchedule("scaled_linear", zero_terminal_snr=zsnr), 15)
        assert list(levels.timesteps) == ref.timesteps.tolist()
        sigmas = [((1 - a) / a) ** 0.5 for a in levels.abar]
        torch.testing.assert_close(torch.tensor(sigmas, dtype=torch.float32), ref.sigmas, rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_zero_terminal_snr_samples_are_finite_and_the_limit_of_a_tiny_terminal_abar(name):
    """From abar = 0 exactly, every sampler is finite (v prediction: D = -v there); with abar_T = 2^-24 instead
    (diffusers' choice) the samples differ by O(sqrt(2^-24))."""
    exact = NoiseSchedule("scaled_linear", zero_terminal_snr=True)
    near = NoiseSchedule("scaled_linear", zero_terminal_snr=True)
    near.alphas_cumprod[-1] = TERMINAL_ABAR
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, spacing = check_sampler(name)
    levels = karras_levels if spacing == "karras" else make_levels
    runs = [sample(name, Denoiser(_net, "v", s), x, levels(s, 10), generator=torch.Generator().manual_seed(1))
            for s in (exact, near)]
    assert torch.isfinite(runs[0]).all()
    if spacing == "karras":
        # Karras spacing starts at the finite 2^-24 level on both schedules (ldm.diffusion.levels): the same run.
        assert karras_levels(exact, 10).abar[0] == karras_levels(near, 10).abar[0] == pytest.approx(TERMINAL_ABAR)
        torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    else:
        assert (runs[0] - runs[1]).abs().max().item() < 2e-3


def test_sampler_options_that_do_not_apply_are_refused():
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        check_sampler("euler")
    with pytest.raises(ValueError, match=r"sampler 'dpmpp_2m' does not use \['eta'\]; it takes no options"):
        check_sampler("dpmpp_2m", {"eta": 0.5})
    with pytest.raises(ValueError, match=r"sampler 'ddpm' does not use \['eta'\]"):
        sample("ddpm", Denoiser(_net, "v", NoiseSchedule()), torch.zeros(1, 4, 8, 8), make_levels(NoiseSchedule(), 2),
               eta=1.0)
    check_sampler("ddim", {"eta": 0.3})
    check_sampler("euler_a", {"eta": 0.3})


def test_cfg_scale_one_is_the_conditional_model_and_guidance_is_one_batched_forward():
    calls = []

    def model_fn(x, t, cond):
        calls.append(x.shape[0])
        return x * cond["context"].mean(dim=(1, 2)).view(-1, 1, 1, 1) + cond["y"].view(-1, 1, 1, 1)

    x, t = torch.randn(3, 4, 8, 8), torch.tensor([5, 6, 7])
    cond = {"context": torch.full((3, 2, 5), 2.0), "y": torch.ones(3, 1)}
    uncond = {"context": torch.zeros(3, 2, 5), "y": torch.zeros(3, 1)}
    torch.testing.assert_close(cfg(model_fn, cond, uncond, 1.0)(x, t), model_fn(x, t, cond))
    calls.clear()
    guided = cfg(model_fn, cond, uncond, 7.5)(x, t)
    assert calls == [6]  # one forward over the concatenated halves
    eps_c, eps_u = x * 2 + 1, torch.zeros_like(x)
    torch.testing.assert_close(guided, eps_u + 7.5 * (eps_c - eps_u))


def test_denoiser_guides_the_denoised_estimate():
    """CFG in D space: D_u + s (D_c - D_u), each half converted with the level's coefficients."""
    sch = NoiseSchedule("scaled_linear")
    cond, uncond = {"y": torch.ones(2, 1)}, {"y": torch.zeros(2, 1)}
    net = lambda x, t, c: x * 0.5 + c["y"].view(-1, 1, 1, 1)  # noqa: E731
    x, a = torch.randn(2, 4, 8, 8), float(sch.alphas_cumprod[500])
    den = Denoiser(net, "v", sch, cond, uncond, 3.0)
    d_c, d_u = (a**0.5 * x - (1 - a) ** 0.5 * net(x, None, c) for c in (cond, uncond))
    torch.testing.assert_close(den(x, 500, a), d_u + 3.0 * (d_c - d_u))


def test_samplers_are_reproducible_with_a_generator():
    sch = NoiseSchedule("scaled_linear")
    x = torch.randn(2, 4, 8, 8)
    levels = make_levels(sch, 10)
    for name, kw in (("ddpm", {}), ("ddim", {"eta": 1.0}), ("euler_a", {})):
        a, b, c = (sample(name, Denoiser(_net, "v", sch), x, levels, generator=torch.Generator().manual_seed(s), **kw)
                   for s in (3, 3, 4))
        assert torch.equal(a, b) and not torch.equal(a, c)
