"""Reconstruction metrics of a first stage over a dataset: PSNR, SSIM and classifier label agreement."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

from ldm.networks.autoencoder import AutoencoderKL


def psnr_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [0, 1], one value per image: 10 log10(1 / MSE)."""
    mse = (pred - target).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)


@torch.no_grad()
def evaluate_reconstruction(ae: AutoencoderKL, batches: Iterable[dict], classifier: nn.Module | None = None,
                            device: str | torch.device = "cpu", autocast: bool = False,
                            fid: FrechetInceptionDistance | None = None) -> dict[str, float]:
    """Posterior-mode reconstructions of every batch; means over images.

    Returns ``psnr`` (mean per-image dB), ``ssim``, ``images``; with a classifier, ``agreement``
    (same predicted label on original and reconstruction), ``acc_original``, ``acc_reconstruction``
    (against the dataset labels); with an FID metric, ``rfid`` (reconstructions vs originals, as the
    LDM paper's rFID; the metric is reset afterwards).
    """
    psnr, ssim, n = 0.0, 0.0, 0
    agree = acc_orig = acc_rec = 0
    for batch in batches:
        x = batch["image"].to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            xrec = ae.decode(ae.encode(x).mode())
        target, pred = (x.float() + 1) / 2, ((xrec.float() + 1) / 2).clamp(0, 1)
        psnr += psnr_per_image(pred, target).sum().item()
        ssim += structural_similarity_index_measure(pred, target, data_range=1.0, reduction="sum").item()
        n += x.shape[0]
        if fid is not None:
            fid.update(target.to(fid.device), real=True)
            fid.update(pred.to(fid.device), real=False)
        if classifier is not None:
            labels = batch["class_label"].to(device)
            p_orig = classifier(x.float()).argmax(1)
            p_rec = classifier(xrec.float().clamp(-1, 1)).argmax(1)
            agree += (p_orig == p_rec).sum().item()
            acc_orig += (p_orig == labels).sum().item()
            acc_rec += (p_rec == labels).sum().item()
    if n == 0:
        raise ValueError("evaluate_reconstruction: no images were given")
    out = {"psnr": psnr / n, "ssim": ssim / n, "images": float(n)}
    if fid is not None:
        out["rfid"] = float(fid.compute())
        fid.reset()
    if classifier is not None:
        out |= {"agreement": agree / n, "acc_original": acc_orig / n, "acc_reconstruction": acc_rec / n}
    return out
