"""A training step never waits for the device: no host reads of device values outside logging steps."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from ldm.training import train
from ldm.utils.dispatch_count import SyncCounter
from ldm.utils.lightning_internals import batches_that_stepped

LOG_EVERY = 4


class CountSyncs(L.Callback):
    """Counts synchronising calls from the start to the end of each training batch (all hooks, the
    forward, backward, optimiser step, EMA, logging and progress bar), per batch."""

    instances: list[CountSyncs] = []

    def __init__(self):
        self.per_batch: list[tuple[bool, int, list[str]]] = []
        self._mode: SyncCounter | None = None
        CountSyncs.instances.append(self)

    def setup(self, trainer, pl_module, stage):
        # Outermost: first of the callbacks at batch start; Lightning calls the module's own batch-end hook
        # after every callback's (progress bar and checkpointing included), so the count stops there.
        trainer.callbacks.remove(self)
        trainer.callbacks.insert(0, self)
        module_end = pl_module.on_train_batch_end

        def on_train_batch_end(*args, **kwargs):
            module_end(*args, **kwargs)
            self._mode.__exit__(None, None, None)
            self.per_batch.append((self._logging, self._mode.total, self._mode.where))

        pl_module.on_train_batch_end = on_train_batch_end

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._logging = (batches_that_stepped(trainer) + 1) % trainer.log_every_n_steps == 0
        self._mode = SyncCounter(record_where=True)
        self._mode.__enter__()


def test_sync_counter_sees_host_reads():
    x = torch.ones(3)
    with SyncCounter() as counter:
        x.sum().item()
        if x.any():
            x.tolist()
        x[x > 0]
        x.to("cpu")
        torch.isfinite(x).all()  # stays on the device: not counted
    assert counter.calls == {"item": 1, "__bool__": 1, "tolist": 1, "boolean-mask index": 1, "to(cpu)": 1}


@pytest.mark.parametrize("stage", ["autoencoder", "latent_diffusion"])
def test_training_steps_make_no_host_reads_outside_logging_steps(stage, make_cfg, make_ldm_cfg):
    CountSyncs.instances.clear()
    common = ["trainer.max_steps=12", f"trainer.log_every_n_steps={LOG_EVERY}", "data.samples_per_epoch=1000",
              "+callbacks.sync_probe._target_=tests.test_step_sync.CountSyncs"]
    if stage == "autoencoder":
        # The discriminator from batch 2 on: both optimisers' guarded steps are counted.
        cfg = make_cfg("ae_f8", *common, "callbacks.export_first_stage=null", "model.loss.disc_start=2")
    else:
        cfg = make_ldm_cfg("ldm_f8", *common, "callbacks.export_pipeline=null", "model.sampling.num_images=1",
                           "trainer.max_steps=10")
    train(cfg)
    (probe,) = CountSyncs.instances
    quiet = [(n, where) for logging, n, where in probe.per_batch[1:] if not logging]
    assert len(quiet) >= 4
    assert all(n == 0 for n, _ in quiet), "\n".join(w for _, ws in quiet for w in ws[:6])


class PoisonGrad(L.Callback):
    """At the given batches, sets one U-Net gradient to NaN after a finite loss's backward (what an overflow in
    the backward pass produces); records weights, EMA and optimiser state around those batches."""

    instances: list[PoisonGrad] = []

    def __init__(self, batches: list[int]):
        self.batches = set(batches)
        self.before: dict = {}
        self.after: dict = {}
        PoisonGrad.instances.append(self)

    @staticmethod
    def _state(trainer, pl_module) -> dict:
        ema = next(c for c in trainer.callbacks if type(c).__name__ == "EMA")._average_model
        opt = trainer.optimizers[0]
        return {"weights": {k: v.clone() for k, v in pl_module.unet.state_dict().items()},
                "ema": {k: v.clone() for k, v in ema.module.unet.state_dict().items()},
                "ema_count": int(ema.n_averaged),
                "moments": [opt.state[p]["exp_avg"].clone() for p in opt.param_groups[0]["params"] if p in opt.state]}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx in self.batches:
            self.before[batch_idx] = self._state(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.fit_loop.epoch_loop.batch_idx in self.batches:
            pl_module.unet.out[-1].weight.grad.view(-1)[0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx in self.batches:
            self.after[batch_idx] = self._state(trainer, pl_module)


def test_a_nan_gradient_with_a_finite_loss_changes_nothing(make_ldm_cfg):
    PoisonGrad.instances.clear()
    cfg = make_ldm_cfg("ldm_f8", "trainer.max_steps=6", "data.samples_per_epoch=1000", "callbacks.export_pipeline=null",
                       "model.sampling.num_images=1", "+callbacks.poison._target_=tests.test_step_sync.PoisonGrad",
                       "+callbacks.poison.batches=[2]")
    metrics = train(cfg)
    (probe,) = PoisonGrad.instances
    before, after = probe.before[2], probe.after[2]
    for what in ("weights", "ema"):
        for k in before[what]:
            torch.testing.assert_close(after[what][k], before[what][k], rtol=0, atol=0, msg=f"{what} {k}")
    assert after["ema_count"] == before["ema_count"]
    for a, b in zip(after["moments"], before["moments"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert metrics["train/nonfinite_skipped"] == 1.0
    ckpt = torch.load(f"{cfg.paths.output_dir}/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6  # 7 batches, the skipped one not counted
    for state in (ckpt["state_dict"], ckpt["current_model_state"]):
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


class ErrorOnSync(CountSyncs):
    """On CUDA: every synchronising CUDA call between batch start and end of a non-logging step raises."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._logging = (batches_that_stepped(trainer) + 1) % trainer.log_every_n_steps == 0
        self._mode = _SyncDebug("default" if self._logging or batch_idx == 0 else "error")
        self._mode.__enter__()


class _SyncDebug:
    """``torch.cuda.set_sync_debug_mode`` for a block; counts nothing (an offending call raises)."""

    def __init__(self, mode: str):
        self.mode, self.total, self.where = mode, 0, []

    def __enter__(self):
        torch.cuda.set_sync_debug_mode(self.mode)
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stage", ["autoencoder", "latent_diffusion"])
def test_cuda_training_steps_do_not_synchronise(stage, make_cfg, make_ldm_cfg):
    CountSyncs.instances.clear()
    common = ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed", "model.compile=false",
              "trainer.max_steps=12", f"trainer.log_every_n_steps={LOG_EVERY}", "data.samples_per_epoch=1000",
              "+callbacks.sync_probe._target_=tests.test_step_sync.ErrorOnSync"]
    if stage == "autoencoder":
        cfg = make_cfg("ae_f8", *common, "callbacks.export_first_stage=null", "model.loss.disc_start=2")
    else:
        cfg = make_ldm_cfg("ldm_f8", *common, "callbacks.export_pipeline=null", "model.sampling.num_images=1")
    train(cfg)  # a synchronising call on a non-logging step raises inside training
    (probe,) = CountSyncs.instances
    assert sum(not logging for logging, _, _ in probe.per_batch) >= 4


def test_the_progress_bar_can_be_switched_off(make_cfg):
    # Lightning refuses a bar callback with the bar off: the run must get through a step without one.
    metrics = train(make_cfg("ae_f8", "+trainer.enable_progress_bar=false", "debug=fdr"))
    assert "train/rec_loss" in metrics and metrics["train/rec_loss"] > 0


def test_the_guard_keeps_its_counts_when_the_checked_parts_change():
    from ldm.stages.guard import NonFiniteGuard

    guard = NonFiniteGuard(max_consecutive=5)
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([p], fused=True)
    p.grad = torch.ones(2)
    guard.step(opt, {"rec_loss": torch.tensor(float("nan"))}, [("autoencoder", [p])])
    assert guard.read(10) == 1
    guard.step(opt, {"rec_loss": torch.tensor(1.0), "g_loss": torch.tensor(float("inf"))}, [("autoencoder", [p])])
    guard.step(opt, {"rec_loss": torch.tensor(1.0), "g_loss": torch.tensor(1.0)}, [("autoencoder", [p])])
    assert guard.read(12) == 1 and guard.skipped == 2  # the new part added to the counts, nothing reset


def _on_fake_cuda(module: torch.nn.Module, mode) -> torch.nn.Module:
    """``module``'s parameters and buffers as fake tensors on a fake ``cuda`` device (no GPU needed)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                with mode:
                    m._parameters[name] = torch.nn.Parameter(mode.from_tensor(p.detach()).to("cuda"),
                                                             requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                with mode:
                    m._buffers[name] = mode.from_tensor(b).to("cuda")
        if hasattr(m, "_device"):  # Lightning's device bookkeeping
            m._device = torch.device("cuda", 0)
    return module


def _copies_per_batch(module, step, batch: dict, batches: int = 3) -> list[list[str]]:
    """Blocking host-to-device copies in each of ``batches`` runs of ``step(batch)``, everything on fake CUDA
    (the batch already transferred, as Lightning does before the step)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ldm.utils.dispatch_count import HostCopyCounter

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _on_fake_cuda(module, mode)
    with mode:
        batch = {k: mode.from_tensor(v).to("cuda") if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    out = []
    for _ in range(batches):
        with mode, HostCopyCounter(record_where=True) as counter:
            step(batch)
        out.append(counter.copies)
    return out


class _NotLogging:
    """The trainer as a training step sees it on a non-logging batch."""

    log_every_n_steps, should_stop = 50, False

    class fit_loop:  # noqa: N801 - mirrors trainer.fit_loop.epoch_loop
        class epoch_loop:  # noqa: N801
            _batches_that_stepped = 0


def test_stage_two_step_copies_nothing_from_the_host_on_cuda(make_ldm_cfg):
    """Forward and loss of a training step (conditioning, latents, noise, timesteps, schedule, weighting) on a
    fake CUDA device: after the first batch (new captions tokenised once) no blocking copy from the host."""
    from ldm.training import build

    stage = build(make_ldm_cfg("ldm_f8").model)
    stage.train()
    stage.log = lambda *args, **kwargs: None
    stage._trainer = _NotLogging()
    batch = {"latent": torch.randn(4, 8, 4, 4), "caption": ["a photo of a bag", "a photo of a coat"] * 2,
             "class_label": torch.tensor([8, 4, 8, 4]), "key": ["a", "b", "c", "d"]}
    copies = _copies_per_batch(stage, lambda b: stage.training_step(b, 0), batch)
    assert copies[1:] == [[], []], copies


def test_stage_one_forward_and_losses_copy_nothing_from_the_host_on_cuda(make_cfg):
    """The autoencoder's forward, generator loss (with the GAN term) and discriminator loss on fake CUDA."""
    from ldm.training import build

    stage = build(make_cfg("ae_f8", "model.loss.disc_start=0").model)
    stage.train()

    def step(batch):
        xrec, posterior = stage.autoencoder(batch["image"])
        with torch.no_grad():  # the adaptive weight's autograd.grad needs a real CUDA context
            stage.loss.generator_loss(batch["image"], xrec, posterior, 1)
        stage.loss.discriminator_loss(batch["image"], xrec)

    copies = _copies_per_batch(stage, step, {"image": torch.rand(2, 3, 32, 32) * 2 - 1})
    assert copies == [[], [], []], copies


def test_the_copy_counter_sees_a_pageable_copy_and_not_a_pinned_async_one():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ldm.utils.dispatch_count import HostCopyCounter

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, HostCopyCounter() as counter:
        x = torch.zeros(3, device="cuda")
        x + torch.ones(3).to("cuda")  # counted
        x + torch.ones(3).to("cuda", non_blocking=True)  # asynchronous: not counted
        x * torch.tensor(2.0)  # a CPU scalar operand: no copy
        x.copy_(torch.ones(3))  # counted
    assert len(counter.copies) == 2, counter.copies
