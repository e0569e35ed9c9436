"""The demo's plan: every part fits the deadline on a fast and a slow machine, and the split follows the rates."""

from __future__ import annotations

import pytest

from ldm.demo.plan import PlanError, Rates, Settings, cache_images, cache_seconds, plan_demo, stage2_seconds
from ldm.demo.probe import probe
from ldm.utils.config import compose

# Rates of the order measured on an AVX-512/AMX Xeon (bf16) and of an AVX2-only EPYC (fp32, from the run).
FAST = Rates(ae_train=45, ldm_train=220, encode=600, denoise=1500, decode=300, classifier_train=1100, startup_s=6)
SLOW = Rates(ae_train=14, ldm_train=105, encode=140, denoise=500, decode=90, classifier_train=600, startup_s=9)
# An AMD EPYC family 26 (AVX-512 BF16, no AMX), as its probe measured in make demo: fast enough for a guide.
GUIDED = Rates(ae_train=72, ldm_train=528, encode=495, denoise=2041, decode=316, classifier_train=1869, startup_s=3)
SPENT = {"dataset shards": 40.0, "probe": 30.0}


@pytest.mark.parametrize("rates", [GUIDED, FAST, SLOW], ids=["guided", "fast", "slow"])
def test_plan_fits_the_deadline_and_gives_training_the_rest(rates):
    s = Settings()
    plan = plan_demo(rates, s, SPENT)
    names = [p.name for p in plan.parts]
    guide = ["guide (ldm_f8_guide)"] if rates is GUIDED else []
    assert names == ["dataset shards", "probe", "classifier", "stage 1 (ae_f8)", "latent cache", "stage 2 (ldm_f8)",
                     *guide, "sampling", "accuracy table"]
    # Everything planned, plus the margin, is exactly the deadline: no time is left unused or overbooked.
    assert plan.total_s + s.margin_s == pytest.approx(60 * s.minutes, abs=1.0)
    # Stage 1's share is of the training time before the cache grows past its minimum (which stage 2 pays for).
    grown = (plan.cache_train_images - s.cache_min) / (0.8 * rates.encode)
    train = plan.ae_seconds + plan.ldm_seconds + plan.guide_seconds + grown
    assert s.ae_share[0] * train - 1 <= plan.ae_seconds <= s.ae_share[1] * train + 1
    assert s.cache_min <= plan.cache_train_images <= s.train_images
    encode_s = 1 / (0.8 * rates.encode)  # per image, loader and writer overlapping the encoder
    cap = max(s.cache_share * (plan.ldm_seconds + plan.guide_seconds), s.cache_min * encode_s) + s.val_images * encode_s
    assert plan.part("latent cache").seconds <= cap + 1


def test_slow_machine_caches_less_and_trains_stage_2_longer_relative_to_stage_1():
    fast, slow = plan_demo(FAST, Settings(), SPENT), plan_demo(SLOW, Settings(), SPENT)
    assert slow.cache_train_images < fast.cache_train_images
    stage2 = lambda plan: plan.ldm_seconds + plan.guide_seconds  # noqa: E731 - the model and its guide
    assert stage2(slow) / slow.ae_seconds >= stage2(fast) / fast.ae_seconds
    # A slow machine is held at the share cap (it cannot reach the stage-1 image target in time).
    assert slow.ae_seconds * SLOW.ae_train < Settings().ae_target_images
    assert slow.ae_seconds == pytest.approx(Settings().ae_share[1] * (slow.ae_seconds + stage2(slow)), rel=0.05)
    # An existing classifier export frees its time for training.
    reuse = plan_demo(SLOW, Settings(need_classifier=False), SPENT)
    assert stage2(reuse) + reuse.ae_seconds > stage2(slow) + slow.ae_seconds + 60


def test_replanning_moves_stage_1_overrun_into_stage_2_and_refuses_a_machine_too_slow():
    s = Settings()
    long_, cache_long = stage2_seconds(900, FAST, s)
    short, cache_short = stage2_seconds(700, FAST, s)
    assert long_ - short == pytest.approx(200, abs=60) and cache_short <= cache_long
    # Once the cache is built, every second left but the grid, the closing table and the margin goes to training.
    built, cache = stage2_seconds(700, FAST, s, cache_train=cache_short)
    assert cache == cache_short and built - short == pytest.approx(cache_seconds(cache_short + s.val_images, FAST))
    assert cache_images(0, SLOW, s) == s.cache_min and cache_images(1e9, FAST, s) == s.train_images
    crawl = Rates(ae_train=1, ldm_train=5, encode=10, denoise=40, decode=5, classifier_train=50, startup_s=10)
    with pytest.raises(PlanError, match="--minutes"):
        plan_demo(crawl, s, SPENT)


def test_probe_measures_the_configured_networks(tmp_path):
    tiny = ["data.resolution=16", "trainer.precision=32-true", f"paths.root_dir={tmp_path}"]
    ae = compose(["experiment=ae_f8", *tiny, "model.autoencoder.ch=8", "model.autoencoder.ch_mult=[1,2]"])
    ldm = compose(["experiment=ldm_f8", *tiny, "model.unet.model_channels=16", "model.unet.num_head_channels=8",
                   "data.batch_size=8", "data.prepare.batch_size=8"])
    rates = probe(ae, ldm, startup_s=1.0, iters=1)
    measured = [rates.ae_train, rates.ldm_train, rates.encode, rates.denoise, rates.decode, rates.classifier_train]
    assert all(0 < v < float("inf") for v in measured) and rates.startup_s == 1.0
    # The plan accepts what the probe measured (tiny networks: fast, so nothing is refused).
    assert plan_demo(rates, Settings(), SPENT).ldm_seconds > 0


def test_bf16_only_where_torch_kernels_run_avx512(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 (or a CPU without AVX-512) means fp32: bf16 would be emulated, slower than fp32."""
    import ldm.utils.config as config

    monkeypatch.setattr("torch.backends.cpu.get_cpu_capability", lambda: "AVX2")
    assert not config.cpu_supports_bf16() and config.auto_precision("cpu") == "32-true"


def test_stage_2_recipe_scales_the_warm_up_with_the_planned_steps():
    from ldm.demo.plan import stage2_overrides, warmup_steps

    s = Settings()
    # 12 minutes at 205 img/s, batch 64: ~2300 steps -> a tenth; 5 minutes on a slow machine: the floor.
    assert warmup_steps(720, Rates(**{**FAST.__dict__, "ldm_train": 205}), s) == 231
    assert warmup_steps(300, SLOW, s) == 50 and warmup_steps(1e6, FAST, s) == 500
    recipe = ["+data.prepare.limits.train=17000", "model.min_snr_gamma=5", "callbacks.lr_schedule.warmup_steps=248"]
    assert stage2_overrides(720, 17000, FAST, s) == recipe  # the export's EMA is the one its guide has
    assert stage2_overrides(720, 17000, FAST, Settings(guide_share=0)) == recipe  # ~2,500 steps: too few snapshots
    assert stage2_overrides(1500, 17000, FAST, Settings(guide_share=0)) == [
        "+data.prepare.limits.train=17000", "model.min_snr_gamma=5", "callbacks.lr_schedule.warmup_steps=500",
        "callbacks.export_pipeline.posthoc_sigma_rel=0.15"]


def test_the_guide_takes_its_share_of_stage_2_and_none_without_it():
    from ldm.demo.plan import guide_overrides, sampling_seconds

    s, none = Settings(), Settings(guide_share=0.0)
    guided, plain = plan_demo(GUIDED, s, SPENT), plan_demo(GUIDED, none, SPENT)
    assert guided.guide_seconds == pytest.approx(s.guide_share * (guided.ldm_seconds + guided.guide_seconds))
    assert plain.guide_seconds == 0 and "guide (ldm_f8_guide)" not in [p.name for p in plain.parts]
    assert plain.total_s == pytest.approx(guided.total_s, abs=1.0)  # both fill the deadline
    # The guide costs its run's start and its forwards in the grid and the table; the rest is training time.
    extra = (guided.part("guide (ldm_f8_guide)").seconds - guided.guide_seconds
             + sum(guided.part(n).seconds - plain.part(n).seconds for n in ("sampling", "accuracy table")))
    trained = lambda plan: plan.ae_seconds + plan.ldm_seconds + plan.guide_seconds  # noqa: E731 - all training
    assert trained(guided) == pytest.approx(trained(plain) - extra, abs=1) and guided.ldm_seconds < plain.ldm_seconds
    table = guided.part("accuracy table").seconds - plain.part("accuracy table").seconds
    assert table == pytest.approx(sampling_seconds(500, GUIDED, 20, 2 + s.guide_cost), rel=0.01)  # + no-guide row
    assert guided.settings == s and not guided.note
    # Where the model would train fewer than guide_min_steps beside a guide, the plan drops the guide (and says so).
    slow = plan_demo(SLOW, s, SPENT)
    assert slow.guide_seconds == 0 and slow.settings.guide_share == 0 and "no guide model" in slow.note
    assert slow.ldm_seconds == plan_demo(SLOW, none, SPENT).ldm_seconds
    assert plan_demo(SLOW, Settings(guide_min_steps=0), SPENT).guide_seconds > 0
    # Its warm-up: a tenth of the steps its budget buys at its (cheaper) step.
    steps = 200 * FAST.ldm_train / s.guide_cost / s.ldm_batch_size
    assert guide_overrides(200, 17000, FAST, s) == ["+data.prepare.limits.train=17000",
                                                    f"callbacks.lr_schedule.warmup_steps={round(0.1 * steps)}"]


def test_make_demo_counts_its_set_up_against_the_deadline():
    """``make demo`` passes its start (--since): the venv and package install are a part already spent, so the
    training budgets shrink by that time and the plan still ends at the deadline."""
    s = Settings()
    plain = plan_demo(FAST, s, SPENT)
    with_setup = plan_demo(FAST, s, {"set-up (make)": 90.0, **SPENT})
    assert with_setup.total_s + s.margin_s == pytest.approx(60 * s.minutes, abs=1.0)
    assert with_setup.part("set-up (make)").seconds == 90.0
    trained = lambda p: p.ae_seconds + p.ldm_seconds + p.guide_seconds
    assert trained(plain) - 90.0 - 1 <= trained(with_setup) < trained(plain) - 60.0


@pytest.mark.parametrize("since", ["+100", "-1900"])
def test_demo_refuses_a_start_after_its_own_or_before_the_deadline(since):
    import time

    from tests.conftest import ROOT
    from tests.script_runner import run_script

    res = run_script(ROOT / "scripts" / "demo.py", "--since", str(time.time() + float(since)), cwd=ROOT)
    assert res.returncode == 2 and "--since" in res.stderr and "expected when `make demo` started" in res.stderr
