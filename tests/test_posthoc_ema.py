"""Post-hoc EMA (Karras et al. 2024, Sec. 3): power-function profiles, least-squares reconstruction from snapshots,
the training callback (resume, rank-0 snapshots) and the export command."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.callbacks.posthoc_ema import PostHocEMA
from ldm.pipeline import LatentDiffusionPipeline
from ldm.posthoc_ema import beta, gamma_of, list_snapshots, reconstruct, sigma_rel_of, write_snapshot
from ldm.training import train
from tests.conftest import ROOT
from tests.script_runner import run_script


def test_sigma_rel_and_gamma_are_the_papers_pairs():
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.01) and gamma_of(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.02, 0.08, 0.15, 0.25):
        assert sigma_rel_of(gamma_of(s)) == pytest.approx(s, rel=1e-9)
    with pytest.raises(ValueError, match="sigma_rel=0.5"):
        gamma_of(0.5)


def _run_profiles(gammas, steps: int, every: int, folder, sigma_rels):
    """A 3-parameter trajectory averaged by power-function EMAs, snapshots every ``every`` steps."""
    profiles = [{"w": torch.zeros(3, dtype=torch.float64)} for _ in gammas]
    for t in range(1, steps + 1):
        theta = torch.tensor([math.sin(t / 150), t / 1000, math.cos(t / 70)], dtype=torch.float64)
        for g, p in zip(gammas, profiles, strict=True):
            p["w"].lerp_(theta, 1 - beta(t, g))
        if folder is not None and t % every == 0:
            write_snapshot(folder, t, sigma_rels, gammas[:2], profiles[:2], dtype=torch.float64)
    return profiles


def test_the_power_ema_weights_the_past_by_tau_to_the_gamma():
    gamma = gamma_of(0.1)
    profile = {"w": torch.zeros(1, dtype=torch.float64)}
    for t in range(1, 4001):
        profile["w"].lerp_(torch.tensor([float(t)], dtype=torch.float64), 1 - beta(t, gamma))
    # the mean of tau under (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]: (gamma + 1) / (gamma + 2) t
    assert profile["w"].item() == pytest.approx((gamma + 1) / (gamma + 2) * 4000, rel=2e-3)


def test_a_width_that_was_never_tracked_is_reconstructed_from_two_profiles(tmp_path):
    stored = [0.05, 0.10]
    gammas = [gamma_of(s) for s in stored] + [gamma_of(0.08)]
    profiles = _run_profiles(gammas, 3000, 100, tmp_path, stored)
    assert [s.step for s in list_snapshots(tmp_path)] == list(range(100, 3001, 100))
    weights, info = reconstruct(tmp_path, 0.08)
    assert info["step"] == 3000 and info["snapshots"] == 30 and info["profile_error"] < 0.05
    torch.testing.assert_close(weights["w"].double(), profiles[2]["w"], atol=5e-3, rtol=0)  # tracked 0.08
    same, info = reconstruct(tmp_path, 0.05)  # a stored width: itself
    torch.testing.assert_close(same["w"].double(), profiles[0]["w"], atol=1e-4, rtol=0)
    earlier, info = reconstruct(tmp_path, 0.10, step=1500)
    assert info["step"] == 1500 and info["snapshots"] == 15
    with pytest.raises(ValueError, match="first snapshot .* is at step 100"):
        reconstruct(tmp_path, 0.1, step=50)
    with pytest.raises(ValueError, match="3 widths, 3 exponents and 2 profiles"):
        write_snapshot(tmp_path, 1, [0.05, 0.1, 0.08], gammas, profiles[:2])


@pytest.mark.slow
def test_training_writes_snapshots_resumes_them_exactly_and_the_command_exports_a_loadable_model(make_ldm_cfg,
                                                                                                  tmp_path):
    def cfg(out: str, steps: int, *extra: str):
        return make_ldm_cfg("ldm_f8", f"paths.output_dir={tmp_path}/{out}", f"trainer.max_steps={steps}",
                            "data.samples_per_epoch=64", "callbacks.posthoc_ema.every_n_steps=2",
                            f"callbacks.export_pipeline.dirpath={tmp_path}/{out}_export",
                            "callbacks.image_logger=null", *extra)

    train(cfg("unbroken", 6))
    train(cfg("broken", 4))
    assert [s.step for s in list_snapshots(tmp_path / "broken" / "posthoc_ema")] == [2, 4]
    train(cfg("broken", 6, f"ckpt_path={tmp_path}/broken/checkpoints/last.ckpt",
              "callbacks.export_pipeline.posthoc_sigma_rel=0.08"))  # the export: that width, reconstructed
    run = {p: list_snapshots(tmp_path / p / "posthoc_ema") for p in ("broken", "unbroken")}
    assert [s.step for s in run["broken"]] == [s.step for s in run["unbroken"]] == [2, 4, 6]
    from safetensors.torch import load_file

    a, b = (load_file(str(run[p][-1].path)) for p in ("broken", "unbroken"))
    assert a.keys() == b.keys() and any(k.startswith("0/unet.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    res = run_script(ROOT / "scripts" / "posthoc_ema.py", "--run", str(tmp_path / "unbroken"), "--sigma-rel", "0.08",
                     "--model", str(tmp_path / "unbroken_export"), "--out", str(tmp_path / "ema008"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sigma_rel 0.08 at step 6 from 3 snapshots" in res.stdout
    weights, _ = reconstruct(tmp_path / "unbroken" / "posthoc_ema", 0.08)
    raw = torch.load(tmp_path / "broken" / "checkpoints" / "last.ckpt", weights_only=True)["current_model_state"]
    for export in ("ema008", "broken_export"):  # the command's export, and the one written when training ended
        pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / export)
        for name, value in weights.items():
            module, _, rest = name.partition(".")
            torch.testing.assert_close(getattr(pipe, module).state_dict()[rest], value, msg=f"{export} {name}")
    assert any(not torch.equal(raw[n], weights[n]) for n in weights)  # not the raw weights
    res = run_script(ROOT / "scripts" / "posthoc_ema.py", "--run", str(tmp_path / "nowhere"), "--list", cwd=tmp_path)
    assert res.returncode == 2 and "nowhere: no such snapshot folder" in res.stderr


def test_bad_settings_and_fsdp_are_refused(tmp_path):
    with pytest.raises(ValueError, match="every_n_steps=0"):
        PostHocEMA(tmp_path, every_n_steps=0)
    with pytest.raises(ValueError, match="dtype='half'"):
        PostHocEMA(tmp_path, dtype="half")
    callback = PostHocEMA(tmp_path, sigma_rels=(0.05, 0.1))
    with pytest.raises(ValueError, match="resume with the same widths"):
        callback.load_state_dict({"step": 3, "sigma_rels": [0.07], "profiles": [{}]})
