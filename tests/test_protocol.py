"""The evaluation protocol (scripts/evaluate.py, ldm/evaluation/protocol.py): Fréchet distance, improved
precision/recall, the cached reference statistics, N samples streamed in chunks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from omegaconf import OmegaConf

from ldm.checkpoints import export_folder
from ldm.evaluation.protocol import (
    FeatureMoments,
    ReferenceStats,
    balanced_conditions,
    frechet_distance,
    precision_recall,
    reference_stats,
)
from ldm.networks.classifier import FashionClassifier
from ldm.pipeline import LatentDiffusionPipeline
from ldm.training import build
from tests.conftest import ROOT, TINY_RES
from tests.script_runner import run_script


def _gaussian(n: int, dim: int, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def test_streamed_moments_and_the_frechet_distance_match_a_direct_computation():
    scale = torch.diag(torch.linspace(0.5, 2, 6, dtype=torch.float64))
    a, b = _gaussian(300, 6), _gaussian(200, 6, 0.5, seed=1) @ scale
    moments = FeatureMoments(6, keep=50)
    for chunk in a.split(64):
        moments.update(chunk)
    mean, cov = moments.mean_cov()
    torch.testing.assert_close(mean, a.mean(0))
    torch.testing.assert_close(cov, torch.cov(a.T))
    assert moments.features().shape == (50, 6)
    mb, cb = b.mean(0), torch.cov(b.T)
    root = scipy.linalg.sqrtm(cov.numpy() @ cb.numpy()).real
    expected = float(((mean - mb) ** 2).sum() + np.trace(cov.numpy() + cb.numpy() - 2 * root))
    assert frechet_distance(mean, cov, mb, cb) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mean, cov, mean, cov) == pytest.approx(0.0, abs=1e-6)


def test_precision_recall_tell_fidelity_from_coverage():
    real = _gaussian(400, 4).float()
    same = _gaussian(400, 4, seed=1).float()
    precision, recall = precision_recall(real, same)
    assert precision > 0.85 and recall > 0.85
    far = _gaussian(400, 4, shift=10.0, seed=2).float()
    assert precision_recall(real, far) == (0.0, 0.0)
    collapsed = real[:5].repeat(80, 1) + 1e-3 * _gaussian(400, 4, seed=3).float()  # faithful, not diverse
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.95 and recall < 0.1
    with pytest.raises(ValueError, match="more than 3 features per side"):
        precision_recall(real[:3], same)


def test_reference_statistics_are_computed_once_and_refused_when_asked_of_something_else(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        feats = _gaussian(40, 3)
        return ReferenceStats(feats.mean(0), torch.cov(feats.T), feats[:10].float(), 40, dict(source), ["a", "b"])

    source = {"reference": "/data/val", "resolution": 256, "limit": None, "extractor": "inception"}
    path = tmp_path / "stats.pt"
    first = reference_stats(path, source, compute)
    again = reference_stats(path, source, compute)
    assert len(calls) == 1 and again.count == 40 and again.captions == ["a", "b"]
    torch.testing.assert_close(again.cov, first.cov)
    with pytest.raises(ValueError, match=r"stats.pt holds reference statistics of something else \(resolution: "
                                         r"file 256, asked 128\)"):
        reference_stats(path, source | {"resolution": 128}, compute)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt: not a reference statistics file"):
        reference_stats(tmp_path / "junk.pt", source, compute)


@pytest.fixture
def class_export(make_ldm_cfg, tmp_path):
    cfg = make_ldm_cfg("ldm_f8", "model/conditioner=class")
    pipe = build(cfg.model).pipeline()
    pipe.config = OmegaConf.to_container(cfg.model, resolve=True)
    return pipe.save_pretrained(tmp_path / "ldm_class")


def test_evaluate_script_caches_the_reference_and_reports_fid_precision_recall(class_export, data_dir, tmp_path):
    torch.manual_seed(0)
    classifier = tmp_path / "classifier"
    export_folder(classifier, FashionClassifier().eval(), "classifier",
                  {"_target_": "ldm.networks.classifier.FashionClassifier"}, {})
    reference = data_dir / f"fashion_mnist_{TINY_RES}" / "val"
    args = ["--model", str(class_export), "--reference", str(reference), "--reference-limit", "16",
            "--num-samples", "10", "--steps", "2", "--batch-size", "4", "--pr-features", "8", "--k", "2",
            "--extractor-weights", str(classifier), "--stats", str(tmp_path / "stats.pt"), "--workers", "0",
            "--out", str(tmp_path / "report")]
    env = {"TORCH_HOME": str(tmp_path / "torch_home")}  # no Inception weights here: auto -> the classifier
    res = run_script(ROOT / "scripts" / "evaluate.py", *args, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_samples"] == 10 and report["reference_images"] == 16
    assert "classifier" in report["extractor"].lower() and report["fid"] > 0
    assert 0 <= report["precision"] <= 1 and 0 <= report["recall"] <= 1
    assert "Inception weights not found: using the offline classifier" in res.stdout + res.stderr
    res = run_script(ROOT / "scripts" / "evaluate.py", *args, cwd=tmp_path, env=env)
    assert res.returncode == 0 and "(16 images, cached)" in res.stdout + res.stderr
    assert json.loads((tmp_path / "report.json").read_text())["fid"] == pytest.approx(report["fid"], rel=1e-6)
    res = run_script(ROOT / "scripts" / "evaluate.py", *args, "--reference-limit", "12", cwd=tmp_path, env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "holds reference statistics of something else (limit: file 16, asked 12)" in res.stderr
    pipe = LatentDiffusionPipeline.from_pretrained(class_export)
    assert balanced_conditions(pipe, 20, []).labels == [i // 2 for i in range(20)]  # 10 classes, 2 each
