"""The demo's time plan: from the rates measured on this machine to each part's budget.

Everything but the two training budgets has a cost that follows from a measured rate (encoding, sampling,
the classifier's steps) or a measured process start. The training time left within the deadline is split
between the stages: stage 1 gets the time to see ``ae_target_images`` at its measured rate, kept between
``ae_share`` bounds of the training time (a slow machine spends the larger share on stage 2, whose steps decide
whether samples are recognisable); stage 2 gets the rest. The latent cache holds only what stage 2 can use:
at most ``cache_share`` of stage 2's time spent encoding (never fewer than ``cache_min`` images, never more
than the dataset), so a slow machine does not spend a third of its demo encoding latents it never reads.

Stage 2 runs a short-budget recipe: Min-SNR-5 loss weighting and a learning-rate warm-up of a tenth of its
planned steps (instead of the config's 500 steps, half of a slow machine's run). At a 5-minute budget on the
same first stage this lifted class accuracy from 59% to 87% (benchmarks/results/demo_run.md).

``guide_share`` of stage 2's training time trains autoguidance's guide after the model (experiment=ldm_f8_guide: 48
of its 64 channels), exported into the model's folder, so that the grid and the closing table sample at the
guided defaults (autoguidance 2.5, cfg 3.5 in (0.5, 3]); the choice is measured in docs/evaluation.md. Only where
the model still gets ``guide_min_steps`` steps: autoguidance helped models of 3,584 and 4,003 steps, was mixed at
2,585 and hurt at 1,575 (an AVX2 run), where the guide's time does more for the model itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Rates:
    """Measured on this machine, at the precision the configs choose (images per second)."""

    ae_train: float          # stage-1 training step (forward, backward, Adam) at its batch size
    ldm_train: float         # stage-2 training step (U-Net + text encoder) at its batch size
    encode: float            # first-stage encoder forward (the latent cache)
    denoise: float           # U-Net forwards per second at sampling batch (one image under CFG takes two)
    decode: float            # first-stage decoder forward
    classifier_train: float  # the evaluation classifier's training step
    startup_s: float         # a Python process importing torch + lightning + the framework


@dataclass(frozen=True)
class Settings:
    """What the demo does and the rules it plans by."""

    minutes: float = 30.0
    margin_s: float = 60.0           # kept free for what the estimates miss
    train_images: int = 60_000       # the dataset's training split
    val_images: int = 2_000          # data.val_limit: the validation subset stage 2 caches
    grid_images: int = 80            # sample.py's grid: 8 per class
    judge_per_class: int = 50        # the closing accuracy table: 500 samples, at the defaults and at baseline_cfg
    baseline_cfg: float = 1.5        # the cfg-only sweep's lowest FID (benchmarks/results/guidance_sweep/before.md)
    sampling_steps: int = 20
    classifier_epochs: int = 2       # when no classifier export exists yet
    need_shards: bool = True
    need_classifier: bool = True
    ae_target_images: int = 30_000
    ae_share: tuple[float, float] = (0.30, 0.45)
    cache_share: float = 0.20
    cache_min: int = 10_000
    ae_stats_images: int = 800       # ExportFirstStage: 50 batches of 16 for the latent statistics
    ldm_batch_size: int = 64         # data.batch_size of ldm_f8 on a CPU
    warmup_fraction: float = 0.1     # of stage 2's planned steps, within warmup_bounds
    warmup_bounds: tuple[int, int] = (50, 500)
    min_snr_gamma: float = 5.0
    posthoc_sigma_rel: float = 0.15  # without a guide, stage 2 exports this post-hoc EMA width (the sweep's choice)
    guide_share: float = 0.24        # of stage 2's training time: the guide (4 of 17 min as measured; 0: none)
    guide_cost: float = 0.64         # a guide step or forward against the model's (48 of 64 channels, measured)
    guide_min_steps: int = 3_500     # the model's planned steps (probe rate) with the guide; fewer: no guide
    posthoc_min_steps: int = 5_000   # planned steps (10 snapshots of 500) for the post-hoc EMA export; fewer: EMA


@dataclass
class Part:
    name: str
    seconds: float
    detail: str


@dataclass
class DemoPlan:
    parts: list[Part] = field(default_factory=list)
    ae_seconds: float = 0.0
    ldm_seconds: float = 0.0
    guide_seconds: float = 0.0
    cache_train_images: int = 0
    settings: Settings = field(default_factory=Settings)  # as planned by: guide_share 0 where no guide fits
    note: str = ""                                          # why the plan differs from the settings asked for

    @property
    def total_s(self) -> float:
        return sum(p.seconds for p in self.parts)

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)


class PlanError(ValueError):
    """The machine is too slow for the demo within its deadline."""


def cache_seconds(images: int, rates: Rates) -> float:
    # Loader decoding and shard writing overlap the encoder; the pipeline runs at ~0.8 of the pure forward rate.
    return images / (0.8 * rates.encode)


def sampling_seconds(images: int, rates: Rates, steps: int, forwards: float = 2.0) -> float:
    """``forwards``: U-Net forwards per image and step (2 under CFG, + the guide's under autoguidance)."""
    return images * forwards * steps / rates.denoise + images / rates.decode


def default_forwards(s: Settings) -> float:
    """Forwards per image and step at the defaults the demo samples with: CFG's two, and the guide's if trained."""
    return 2.0 + (s.guide_cost if s.guide_share > 0 else 0.0)


def cache_images(ldm_seconds: float, rates: Rates, s: Settings) -> int:
    """Training images to encode: ``cache_share`` of stage 2's time, within [cache_min, the dataset]."""
    budget = s.cache_share * ldm_seconds * 0.8 * rates.encode
    return int(min(s.train_images, max(s.cache_min, budget // 1000 * 1000)))  # whole thousands, never over


def classifier_part(rates: Rates, s: Settings) -> Part:
    # + reading and resizing the dataset, and a test-set pass per epoch
    return Part("classifier", rates.startup_s + 35 + s.classifier_epochs * s.train_images / rates.classifier_train,
                f"{s.classifier_epochs} epochs at {rates.classifier_train:.0f} img/s (the judge of the closing table)")


def cache_part(cache_train: int, rates: Rates, s: Settings) -> Part:
    return Part("latent cache", cache_seconds(cache_train + s.val_images, rates),
                f"{cache_train:,} train + {s.val_images:,} val images at ~{0.8 * rates.encode:.0f} img/s")


def tail_parts(rates: Rates, s: Settings) -> list[Part]:
    """The parts after stage 2: the grid and the closing table."""
    n = 10 * s.judge_per_class
    guided = s.guide_share > 0
    rows = [default_forwards(s), 2.0] + ([2.0] if guided else [])  # the defaults, cfg baseline_cfg (, no guide)
    what = "the defaults" + (", without the guide" if guided else "")
    return [Part("sampling", rates.startup_s + 7 + sampling_seconds(s.grid_images, rates, s.sampling_steps,
                                                                    default_forwards(s)),
                 f"grid of {s.grid_images} images, {s.sampling_steps} steps, " + ("autoguidance + CFG" if guided
                                                                                  else "CFG")),
            # + loading the pipeline and the judge, reading the reference images and their features
            Part("accuracy table", 25 + sum(sampling_seconds(n, rates, s.sampling_steps, f) for f in rows),
                 f"{n} samples ({s.judge_per_class} per class) at {what} and at cfg {s.baseline_cfg:g}, judged by "
                 "the classifier")]


def stage_overhead(rates: Rates) -> float:
    """A training run's time besides its budget: process start, data loaders, checkpoint and export."""
    return rates.startup_s + 13


def stage2_runs(s: Settings) -> int:
    """Training runs on the latents: the model, and its guide when one is planned."""
    return 2 if s.guide_share > 0 else 1


def stage2_seconds(left_s: float, rates: Rates, s: Settings, cache_train: int | None = None) -> tuple[float, int]:
    """Stage 2's training time (the model's and its guide's budgets together, ``split_stage2``) and the cache size
    given ``left_s`` seconds before the deadline: once stage 1 is done (the cache still to build: its size depends
    on the budget and the budget on its cost, a few rounds settle both), or with ``cache_train`` once the cache is
    built (only the grid and the closing table remain)."""
    tail = stage2_runs(s) * stage_overhead(rates) + sum(p.seconds for p in tail_parts(rates, s))
    if cache_train is not None:
        return left_s - s.margin_s - tail, cache_train
    cache_train = s.cache_min
    for _ in range(4):
        ldm = left_s - s.margin_s - tail - cache_part(cache_train, rates, s).seconds
        cache_train = cache_images(max(ldm, 0.0), rates, s)
    return left_s - s.margin_s - tail - cache_part(cache_train, rates, s).seconds, cache_train


def split_stage2(train_s: float, s: Settings) -> tuple[float, float]:
    """(the model's budget, its guide's): ``guide_share`` of stage 2's training time goes to the guide."""
    return (1 - s.guide_share) * train_s, s.guide_share * train_s


def model_steps(ldm_seconds: float, rates: Rates, s: Settings) -> float:
    """Stage 2's training steps in ``ldm_seconds`` at the probe's step rate (the real run has its loaders too)."""
    return ldm_seconds * rates.ldm_train / s.ldm_batch_size


def warmup_steps(ldm_seconds: float, rates: Rates, s: Settings, cost: float = 1.0) -> int:
    """Stage 2's learning-rate warm-up: ``warmup_fraction`` of the steps its budget buys at the measured rate
    (``cost``: a step's time against the model's, for the guide)."""
    steps = model_steps(ldm_seconds, rates, s) / cost
    lo, hi = s.warmup_bounds
    return int(min(hi, max(lo, round(s.warmup_fraction * steps))))


def stage2_overrides(ldm_seconds: float, cache_train: int, rates: Rates, s: Settings) -> list[str]:
    """train.py overrides for stage 2: the cache size, the short-budget recipe (Min-SNR, planned warm-up) and,
    without a guide, the post-hoc EMA width its export takes. With a guide the export keeps the EMA the guide also
    has: autoguidance by a guide of the standard EMA from a post-hoc EMA 0.15 model fell to 72% accuracy at FID 70
    (the same model's standard EMA: 92% at 17.5; docs/evaluation.md). A short run has too few snapshots for the
    post-hoc width: 3 snapshots (1,495 steps) matched its profile to 13.6% and gave 31% accuracy where the standard
    EMA gave 96.5%, 6 to 6.3%, 10 (4,899 steps) to 2.1%: below ``posthoc_min_steps`` the standard EMA is exported."""
    posthoc = [f"callbacks.export_pipeline.posthoc_sigma_rel={s.posthoc_sigma_rel:g}"] \
        if s.guide_share == 0 and model_steps(ldm_seconds, rates, s) >= s.posthoc_min_steps else []
    return [f"+data.prepare.limits.train={cache_train}", f"model.min_snr_gamma={s.min_snr_gamma:g}",
            f"callbacks.lr_schedule.warmup_steps={warmup_steps(ldm_seconds, rates, s)}", *posthoc]


def guide_overrides(guide_seconds: float, cache_train: int, rates: Rates, s: Settings) -> list[str]:
    """train.py overrides for the guide (experiment=ldm_f8_guide): the model's latent cache and a planned warm-up."""
    return [f"+data.prepare.limits.train={cache_train}",
            f"callbacks.lr_schedule.warmup_steps={warmup_steps(guide_seconds, rates, s, s.guide_cost)}"]


def guide_part(guide_s: float, rates: Rates, s: Settings) -> Part:
    return Part("guide (ldm_f8_guide)", guide_s + stage_overhead(rates),
                f"{guide_s / 60:.1f} min budget: ~{guide_s * rates.ldm_train / s.guide_cost:,.0f} samples, 48 of 64 "
                "channels, exported into exports/ldm_f8/guide")


def stage2_part(ldm_s: float, rates: Rates) -> Part:
    return Part("stage 2 (ldm_f8)", ldm_s + stage_overhead(rates),
                f"{ldm_s / 60:.1f} min budget: ~{ldm_s * rates.ldm_train:,.0f} samples at {rates.ldm_train:.0f} "
                "img/s (step rate), Min-SNR-5, then export")


def plan_demo(rates: Rates, s: Settings, spent: dict[str, float] | None = None) -> DemoPlan:
    """The whole demo's plan, after the parts already done (``spent``: name -> measured seconds); without the guide
    (``plan.settings.guide_share`` 0) where the model would get fewer than ``guide_min_steps`` steps with it."""
    plan = _plan(rates, s, spent)
    steps = model_steps(plan.ldm_seconds, rates, s)
    if plan.guide_seconds > 0 and steps < s.guide_min_steps:
        plan = _plan(rates, replace(s, guide_share=0.0), spent)
        plan.note = (f"no guide model: beside one, stage 2's model would train ~{steps:,.0f} steps, fewer than the "
                     f"{s.guide_min_steps:,} at which autoguidance helped (ldm/demo/plan.py); the model gets its time")
    return plan


def _plan(rates: Rates, s: Settings, spent: dict[str, float] | None = None) -> DemoPlan:
    spent = spent or {}
    deadline = 60 * s.minutes - sum(spent.values())
    # + the latent statistics of the export and a last validation pass (encode and decode the validation images)
    stage1_overhead = (stage_overhead(rates) + (s.ae_stats_images + s.val_images) / rates.encode
                       + s.val_images / rates.decode)
    first = [classifier_part(rates, s)] if s.need_classifier else []
    # First pass: the parts after stage 1 at the smallest cache, to size the training time to split.
    fixed = sum(p.seconds for p in first) + stage2_runs(s) * stage_overhead(rates) \
        + cache_part(s.cache_min, rates, s).seconds + sum(p.seconds for p in tail_parts(rates, s))
    train = deadline - s.margin_s - stage1_overhead - fixed
    lo, hi = s.ae_share
    ae = min(max(s.ae_target_images / rates.ae_train, lo * train), hi * train)
    train2, cache_train = stage2_seconds(deadline - sum(p.seconds for p in first) - stage1_overhead - ae, rates, s)
    ldm, guide = split_stage2(train2, s)
    if ae < 60 or ldm < 120:
        raise PlanError(f"this machine leaves {ae:.0f} s for stage 1 and {ldm:.0f} s for stage 2 within "
                        f"{s.minutes:g} minutes (measured: stage 1 {rates.ae_train:.1f} img/s, stage 2 "
                        f"{rates.ldm_train:.1f} img/s); give the demo more time with --minutes")
    plan = DemoPlan(ae_seconds=ae, ldm_seconds=ldm, guide_seconds=guide, cache_train_images=cache_train, settings=s)
    plan.parts.extend(Part(name, seconds, "done (measured)") for name, seconds in spent.items())
    plan.parts.extend(first)
    plan.parts.append(Part("stage 1 (ae_f8)", ae + stage1_overhead,
                           f"{ae / 60:.1f} min budget: ~{ae * rates.ae_train:,.0f} images at {rates.ae_train:.1f} "
                           "img/s (step rate), then latent statistics and export"))
    plan.parts.append(cache_part(cache_train, rates, s))
    plan.parts.append(stage2_part(ldm, rates))
    if guide > 0:
        plan.parts.append(guide_part(guide, rates, s))
    plan.parts.extend(tail_parts(rates, s))
    return plan
