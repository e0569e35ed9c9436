"""The one learning-rate schedule both stages use: warm-up, then constant/linear/cosine decay to the budget."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest

from ldm.callbacks.lr_schedule import LRSchedule, lr_factor
from ldm.training import train


def test_lr_factor_shapes():
    assert [lr_factor(b, 0.0, 4, "constant", 0.2, 0.0) for b in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(100, 0.5, 4, "linear", 0.2, 0.0) == 1.0  # stable until the last 20%
    assert lr_factor(100, 0.9, 4, "linear", 0.2, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 1.0, 4, "linear", 0.2, 0.1) == pytest.approx(0.1)
    assert lr_factor(100, 0.5, 0, "cosine", 1.0, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 0.25, 0, "cosine", 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(100, 0.99, 0, "constant", 1.0, 0.0) == 1.0


@pytest.mark.parametrize("kwargs,match", [(dict(decay="step"), r"decay='step': expected one of"),
                                          (dict(warmup_steps=-1), r"warmup_steps=-1: expected an integer >= 0"),
                                          (dict(decay_fraction=1.5), r"decay_fraction=1.5"),
                                          (dict(final_factor=2.0), r"final_factor=2.0")])
def test_bad_settings_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LRSchedule(**kwargs)


def _logged_lr(run: Path) -> dict[int, float]:
    rows = csv.DictReader(open(run / "csv" / "metrics.csv"))
    return {int(r["step"]): float(r["train/lr"]) for r in rows if r.get("train/lr")}


def test_stage_two_follows_warmup_then_cosine_and_logs_the_lr(make_ldm_cfg):
    cfg = make_ldm_cfg("ldm_f8", "trainer.max_steps=8", "callbacks.lr_schedule.warmup_steps=4",
                       "callbacks.lr_schedule.decay=cosine", "callbacks.lr_schedule.decay_fraction=0.5",
                       "callbacks.export_pipeline=null", "data.samples_per_epoch=64")
    train(cfg)
    lrs = _logged_lr(Path(cfg.paths.output_dir))
    base = cfg.model.optimizer.lr
    assert sorted(lrs) == list(range(8))
    for step, lr in lrs.items():
        assert lr == pytest.approx(base * lr_factor(step, step / 8, 4, "cosine", 0.5, 0.0)), step
    assert lrs[3] == pytest.approx(base) and lrs[7] < lrs[5] < lrs[4] == pytest.approx(base)


def test_scale_lr_multiplies_both_stage_one_optimisers_by_the_global_batch(make_cfg):
    cfg = make_cfg("ae_f8", "scale_lr=true", "trainer.max_steps=4", "callbacks.export_first_stage=null",
                   "+callbacks.probe._target_=tests.test_lr_schedule.LastLR")
    train(cfg)
    # batch 4 x 1 device: both optimisers' base learning rates x 4; the first batch runs at the full rate
    assert [g["base_lr"] for g in LAST_LR] == pytest.approx([cfg.model.optimizer.lr * 4,
                                                             cfg.model.disc_optimizer.lr * 4])
    assert _logged_lr(Path(cfg.paths.output_dir))[0] == pytest.approx(cfg.model.optimizer.lr * 4)


@pytest.mark.parametrize("scale_lr, base", [(True, 6e-4), (False, 3e-4)])
def test_a_resume_at_another_world_size_rescales_the_base_lr_as_scale_lr_says(caplog, scale_lr, base):
    """A run checkpointed at global batch 8 (2 ranks x 4) resumes on 4 ranks: base lr x 16/8 under scale_lr, kept as
    configured otherwise; the log names the change (the end-to-end resume: tests/test_scale_out.py)."""
    opt = SimpleNamespace(param_groups=[{"lr": 3e-4, "base_lr": 3e-4, "global_batch": 8}])
    trainer = SimpleNamespace(max_steps=100, max_epochs=None, callbacks=[], optimizers=[opt],
                              datamodule=SimpleNamespace(batch_size=4), num_devices=4, num_nodes=1,
                              accumulate_grad_batches=1)
    with caplog.at_level(logging.INFO, logger="ldm.callbacks.lr_schedule"):
        LRSchedule(scale_lr=scale_lr).on_train_start(trainer, None)
    group = opt.param_groups[0]
    assert group["base_lr"] == pytest.approx(base) and group["global_batch"] == 16
    rule = "base lr 0.0003 -> 0.0006 (scale_lr" if scale_lr else "base lr 0.0003 as configured (scale_lr=false)"
    assert f"global batch 8 -> 16: optimiser 0 {rule}" in caplog.text


LAST_LR: list[dict] = []


class LastLR(L.Callback):
    def on_train_end(self, trainer, pl_module):
        LAST_LR[:] = [o.param_groups[0] for o in trainer.optimizers]
