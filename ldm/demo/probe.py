"""Measure what the demo's plan needs on this machine, in a few seconds: the rates of both stages' training steps,
of the encoder (latent cache), the U-Net's sampling forward and the decoder, and the classifier's training step.

The networks are the ones the experiments' configs build, at the precision the trainer will choose
(``trainer.precision``), fed random inputs of the real shapes; the optimisers are the configs' (fused Adam/AdamW).
Each rate is the median of a few timed steps after a warm-up step.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig

from ldm.demo.plan import Rates
from ldm.networks.classifier import FashionClassifier
from ldm.utils.timing import median_seconds

log = logging.getLogger(__name__)


def _autocast(precision: str):
    bf16 = str(precision).startswith("bf16")
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def _first_stage_rates(ae_cfg: DictConfig, encode_batch: int, precision: str, iters: int) -> dict[str, float]:
    stage1 = instantiate(ae_cfg.model)
    ae, loss = stage1.autoencoder, stage1.loss
    opt = instantiate(ae_cfg.model.optimizer)(ae.parameters())
    res = ae_cfg.data.resolution
    x = torch.rand(ae_cfg.data.batch_size, ae_cfg.model.autoencoder.in_channels, res, res) * 2 - 1

    def step():
        with _autocast(precision):
            xrec, post = ae(x)
            g_loss, _ = loss.generator_loss(x, xrec, post, 0, last_layer=ae.decoder.last_layer)
        opt.zero_grad(set_to_none=True)
        g_loss.backward()
        opt.step()

    rates = {"ae_train": len(x) / median_seconds(step, warmup=1, iters=iters)}
    ae.eval()
    xb = torch.rand(encode_batch, *x.shape[1:]) * 2 - 1
    z = torch.randn(100, *ae.latent_shape())
    with torch.no_grad(), _autocast(precision):
        rates["encode"] = len(xb) / median_seconds(lambda: ae.moments(xb), warmup=1, iters=iters)
        rates["decode"] = len(z) / median_seconds(lambda: ae.decode(z), warmup=1, iters=iters)
    return rates


def _unet_rates(ldm_cfg: DictConfig, latent_hw: tuple[int, int], precision: str, iters: int) -> dict[str, float]:
    unet, cond = instantiate(ldm_cfg.model.unet), instantiate(ldm_cfg.model.conditioner)
    opt = instantiate(ldm_cfg.model.optimizer)([*unet.parameters(), *cond.parameters()])
    b = ldm_cfg.data.batch_size
    batch = {"caption": ["a photo of a sneaker"] * b, "class_label": torch.zeros(b, dtype=torch.long)}
    z, t = torch.randn(b, unet.in_channels, *latent_hw), torch.randint(0, 1000, (b,))

    def step():
        with _autocast(precision):
            c = cond(batch)
            mse = F.mse_loss(unet(z, t, context=c["context"], y=c["y"]).float(), z)
        opt.zero_grad(set_to_none=True)
        mse.backward()
        opt.step()

    rates = {"ldm_train": b / median_seconds(step, warmup=1, iters=iters)}
    unet.eval()
    cond.eval()
    n = 200  # sampling batch 100 under CFG: the conditional and unconditional halves in one forward
    zs, ts = torch.randn(n, unet.in_channels, *latent_hw), torch.full((n,), 500)
    with torch.no_grad(), _autocast(precision):
        c = cond({"caption": ["a photo of a bag"] * n, "class_label": torch.zeros(n, dtype=torch.long)})
        rates["denoise"] = n / median_seconds(lambda: unet(zs, ts, context=c["context"], y=c["y"]), warmup=1,
                                              iters=iters)
    return rates


def _classifier_rate(resolution: int, iters: int, batch: int = 128) -> float:
    """The evaluation classifier's training step as scripts/train_classifier.py runs it (fp32, AdamW)."""
    clf = FashionClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-3)
    x, y = torch.rand(batch, 1, resolution, resolution) * 2 - 1, torch.randint(0, 10, (batch,))

    def step():
        loss = F.cross_entropy(clf(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / median_seconds(step, warmup=1, iters=iters)


def probe(ae_cfg: DictConfig, ldm_cfg: DictConfig, startup_s: float, iters: int = 3) -> Rates:
    """Rates for ``ae_cfg`` (the composed stage-1 experiment) and ``ldm_cfg`` (stage 2) on the CPU."""
    torch.manual_seed(0)
    precision = str(ae_cfg.trainer.precision)
    f = 2 ** (len(ae_cfg.model.autoencoder.ch_mult) - 1)
    latent_hw = (ae_cfg.data.resolution // f,) * 2
    rates = _first_stage_rates(ae_cfg, ldm_cfg.data.prepare.batch_size, precision, iters)
    rates |= _unet_rates(ldm_cfg, latent_hw, precision, iters)
    rates = Rates(**rates, classifier_train=_classifier_rate(ae_cfg.data.resolution, iters), startup_s=startup_s)
    log.info("measured at %s: %s", precision, rates)
    return rates
