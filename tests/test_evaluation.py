"""Evaluation and tracking: FID (custom and Inception extractors, DDP), CLIP score, W&B offline runs,
the ablation report and the guidance sweep."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from unittest import mock

import numpy as np
import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.image.fid import FrechetInceptionDistance

from ldm.checkpoints import export_folder
from ldm.evaluation.clip_score import CLIPScore
from ldm.evaluation.features import ClassifierFeatures, InceptionFeatures
from ldm.networks.classifier import FashionClassifier
from ldm.training import train
from tests.conftest import ROOT, TINY_RES
from tests.script_runner import run_script

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory) -> Path:
    """A random-init Fashion-MNIST classifier exported as scripts/train_classifier.py would."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("classifier") / "fashion_classifier"
    export_folder(path, FashionClassifier().eval(), "classifier",
                  {"_target_": "ldm.networks.classifier.FashionClassifier"}, {})
    return path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> tuple[str, Path]:
    """A tiny open_clip architecture registered under a name, with random weights saved to a file."""
    root = tmp_path_factory.mktemp("clip")
    (root / "tiny-test-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(root / "tiny-test-clip.json")
    torch.manual_seed(0)
    weights = root / "tiny_clip.pt"
    torch.save(open_clip.create_model("tiny-test-clip").state_dict(), weights)
    return "tiny-test-clip", weights


def random_inception_file(path: Path) -> Path:
    """InceptionV3 with random weights in torch-fidelity's layout (built without loading any file)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None), \
            mock.patch("torch.load", return_value={}):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    torch.save(net.state_dict(), path)
    return path


def test_inception_fid_from_a_local_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth.*weights-inception-2015-12-05-6726825d\.pth"):
        InceptionFeatures(tmp_path / "nowhere.pth")
    extractor = InceptionFeatures(random_inception_file(tmp_path / "inception.pth"))
    assert "inception.pth" in extractor.description
    fid = FrechetInceptionDistance(feature=extractor, normalize=True)
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(6, 3, 32, 32, generator=gen)
    fid.update(real, real=True)
    fid.update(real, real=False)
    same = float(fid.compute())
    fid.reset()
    fid.update(real, real=True)
    fid.update(torch.rand(6, 3, 32, 32, generator=gen) * 0.3, real=False)
    assert abs(same) < 1e-2 * float(fid.compute())


def test_inception_weights_that_would_run_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "inception.pth"
    torch.save({"w": Evil()}, path)
    with pytest.raises(ValueError, match=r"refusing Inception weights file .*inception\.pth.*weights_only=True"):
        InceptionFeatures(path)


def test_clip_score_is_the_clamped_cosine(tiny_clip):
    arch, weights = tiny_clip
    metric = CLIPScore(arch, str(weights))
    images = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    prompts = ["a photo of a bag", "a photo of a coat", "a photo of a dress", "a photo of a shirt"]
    model = metric.model
    x = torch.nn.functional.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    x = (x - metric.mean) / metric.std
    cos = torch.nn.functional.cosine_similarity(model.encode_image(x), model.encode_text(metric.tokenizer(prompts)))
    metric.update(images[:2], prompts[:2])
    metric.update(images[2:], prompts[2:])
    torch.testing.assert_close(metric.compute(), (100 * cos.clamp_min(0)).mean(), rtol=1e-4, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        CLIPScore(arch, "/nowhere/missing.pt")


def _ddp_fid(rank: int, world: int, init: str, classifier: str, real: torch.Tensor, fake: torch.Tensor,
             out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    fid = FrechetInceptionDistance(feature=ClassifierFeatures(classifier), normalize=True)
    share = len(real) // world
    fid.update(real[rank * share:(rank + 1) * share], real=True)
    fid.update(fake[rank * share:(rank + 1) * share], real=False)
    value = float(fid.compute())  # all-reduces the feature sums across ranks
    if rank == 0:
        Path(out).write_text(repr(value))
    dist.destroy_process_group()


def test_two_process_fid_equals_one_process_fid(tmp_path, classifier_dir):
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(40, 3, TINY_RES, TINY_RES, generator=gen)
    fake = (torch.rand(40, 3, TINY_RES, TINY_RES, generator=gen) * 0.8 + 0.1)
    fid = FrechetInceptionDistance(feature=ClassifierFeatures(classifier_dir), normalize=True)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    single = float(fid.compute())
    out = tmp_path / "fid.txt"
    mp.spawn(_ddp_fid, args=(2, f"file://{tmp_path}/store", str(classifier_dir), real, fake, str(out)), nprocs=2)
    assert float(out.read_text()) == pytest.approx(single, rel=1e-5)
    assert single > 0


def _wandb_run_dirs(save_dir: Path) -> list[Path]:
    return sorted((save_dir / "wandb").glob("offline-run-*"))


def test_fid_and_clip_callbacks_log_to_an_offline_wandb_run_that_resumes(make_ldm_cfg, classifier_dir, tiny_clip,
                                                                         tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    arch, weights = tiny_clip
    wandb_dir = tmp_path / "wandb_runs"

    def cfg_for(run: str, *extra: str):
        return make_ldm_cfg("ldm_f8", "callbacks=latent_diffusion_eval", "logger=many",
                            f"paths.output_dir={tmp_path}/{run}",
                            f"logger.wandb.save_dir={wandb_dir}", "logger.wandb.offline=true",
                            f"callbacks.fid.weights={classifier_dir}", f"callbacks.clip_score.arch={arch}",
                            f"callbacks.clip_score.pretrained={weights}", "callbacks.sample_eval.num_samples=6",
                            "callbacks.sample_eval.every_n_steps=2", "callbacks.sample_eval.steps=2",
                            "data.samples_per_epoch=16", *extra)

    metrics = train(cfg_for("run1", "trainer.max_steps=4"))
    assert np.isfinite(metrics["eval/fid_classifier"]) and metrics["eval/fid_classifier"] > 0
    assert 0 <= metrics["eval/clip_score"] <= 100
    run_id = (tmp_path / "run1" / "wandb_id.txt").read_text()
    (first,) = _wandb_run_dirs(wandb_dir)
    assert first.name.endswith(run_id)
    # The run folder holds what `wandb sync` uploads: the binary log with our keys, config, media.
    # (W&B's service process writes the log; on a loaded machine its last records may land just after finish().)
    keys, deadline = (b"train/loss", b"eval/fid_classifier", b"eval/clip_score", b"val/samples"), time.time() + 60
    log = next(first.glob("*.wandb"))
    while not all(k in (log_bytes := log.read_bytes()) for k in keys) and time.time() < deadline:
        time.sleep(0.5)
    assert [k for k in keys if k not in log_bytes] == []
    assert list((first / "files" / "media" / "images").glob("val/samples_*.png"))
    csv_rows = list(csv.DictReader(open(tmp_path / "run1" / "csv" / "metrics.csv")))
    fid_steps = [int(r["step"]) for r in csv_rows if r.get("eval/fid_classifier")]
    assert fid_steps == [2, 4]  # every 2 steps; the end of fit at step 4 is not evaluated twice

    train(cfg_for("run2", "trainer.max_steps=6", f"ckpt_path={tmp_path}/run1"))
    assert (tmp_path / "run2" / "wandb_id.txt").read_text() == run_id
    runs = _wandb_run_dirs(wandb_dir)
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory, data_dir, export_dir):
    """The tiny first stages plus a tiny ldm_f8 trained for 2 steps on them (exported)."""
    from tests.conftest import compose_cfg, tiny_ldm_overrides, tiny_overrides

    root = tmp_path_factory.mktemp("ldm_run")
    skip = ("model.autoencoder", "model.loss", "+data.prepare.limit", "data.prepare.samples_per_shard",
            "data.batch_size")
    overrides = [o for o in tiny_overrides(root, data_dir) if not o.startswith(skip)]
    cfg = compose_cfg(["experiment=ldm_f8", *overrides, *tiny_ldm_overrides(export_dir), "trainer.max_steps=2",
                       "data.samples_per_epoch=8"])
    train(cfg)
    return export_dir


def _script(*args: str) -> subprocess.CompletedProcess:
    return run_script(*args, cwd=ROOT, timeout=600)


def test_ablation_report_and_guidance_sweep_write_tables_and_plots(tiny_exports, data_dir, classifier_dir, tmp_path):
    common = ["--reference", str(data_dir / f"fashion_mnist_{TINY_RES}" / "val"), "--resolution", str(TINY_RES),
              "--num-samples", "8", "--classifier", str(classifier_dir), "--extractor-weights", str(classifier_dir),
              "--steps", "2"]
    res = _script("scripts/ablation_report.py", "--exports", str(tiny_exports), "--recon-images", "16",
                  "--out", str(tmp_path / "ablation"), "--seeds", "0", "1", *common)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "ablation" / "ablation_f.csv")))
    assert [r["f"] for r in rows] == ["4", "8", "16"]
    assert [r["latent"] for r in rows] == ["3x8x8", "4x4x4", "16x2x2"]
    assert all(float(r["PSNR"]) > 0 and float(r["rFID"]) >= 0 for r in rows)
    assert rows[1]["FID"] and not rows[0]["FID"]  # only f=8 has a stage-2 export here
    per_seed = [float(v) for v in rows[1]["FID per seed"].split(" / ")]
    assert len(per_seed) == 2 and float(rows[1]["FID"]) == pytest.approx(sum(per_seed) / 2, abs=0.01)
    assert float(rows[1]["FID spread"]) == pytest.approx(max(per_seed) - min(per_seed), abs=0.01)
    assert "no stage-2 export" in res.stderr
    for png in ("reconstruction_vs_f.png", "throughput_vs_f.png"):
        assert (tmp_path / "ablation" / png).stat().st_size > 1000
    md = (tmp_path / "ablation" / "ablation_f.md").read_text()
    assert "| f | latent |" in md and "## Findings" in md and "PSNR " in md
    # Two-step samples of an untrained model are at chance: the report says so instead of plotting them.
    if float(rows[1]["class acc %"]) < 20:
        assert "too short" in md and not (tmp_path / "ablation" / "generation_vs_f.png").exists()

    # The model as its own autoguidance guide: D_c - D_guide = 0, so weight 2 must give weight 1's samples.
    res = _script("scripts/guidance_sweep.py", "--model", str(tiny_exports / "ldm_f8"), "--scales", "1", "3",
                  "--intervals", "off", "0.5,3", "--guide", str(tiny_exports / "ldm_f8"), "--autoguidance", "1", "2",
                  "--out", str(tmp_path / "sweep"), *common)
    assert res.returncode == 0, res.stderr[-3000:]
    all_rows = list(csv.DictReader(open(tmp_path / "sweep" / "guidance_sweep.csv")))
    rows = [r for r in all_rows if r["autoguidance"] == "1"]
    assert [(r["cfg scale"], r["interval"]) for r in rows] == [("1", "off"), ("3", "off"), ("3", "(0.5, 3]")]
    same_guide = [r for r in all_rows if r["autoguidance"] == "2"]
    assert [(r["fid_classifier"], r["class_accuracy"]) for r in same_guide] == \
        [(r["fid_classifier"], r["class_accuracy"]) for r in rows]
    rows = all_rows
    assert all(float(r["fid_classifier"]) > 0 and 0 <= float(r["class_accuracy"]) <= 100 for r in rows)
    assert "yes" in [r["pareto"] for r in rows] and (tmp_path / "sweep" / "guidance_sweep.png").is_file()
    res = _script("scripts/guidance_sweep.py", "--merge", str(tmp_path / "sweep" / "guidance_sweep.csv"),
                  str(tmp_path / "sweep" / "guidance_sweep.csv"), "--out", str(tmp_path / "merged"), *common)
    assert res.returncode == 0, res.stderr[-3000:]
    merged = list(csv.DictReader(open(tmp_path / "merged" / "guidance_sweep.csv")))
    assert merged == rows  # the same settings once, the same front
    assert "- cfg 3: FID" in (tmp_path / "merged" / "guidance_sweep.md").read_text()

    # --seeds: each setting once per seed, the mean in the usual columns and every seed's scores beside it.
    one = ["--model", str(tiny_exports / "ldm_f8"), "--scales", "3", *common]
    for name, seeds in (("seed1", ["--seed", "1"]), ("seeds", ["--seeds", "0", "1"])):
        res = _script("scripts/guidance_sweep.py", *one, *seeds, "--out", str(tmp_path / name))
        assert res.returncode == 0, res.stderr[-3000:]
    seed1, = list(csv.DictReader(open(tmp_path / "seed1" / "guidance_sweep.csv")))
    both, = list(csv.DictReader(open(tmp_path / "seeds" / "guidance_sweep.csv")))
    seed0 = next(r for r in rows if r["autoguidance"] == "1" and r["cfg scale"] == "3" and r["interval"] == "off")
    for key in ("fid_classifier", "class_accuracy"):
        assert float(both[key]) == pytest.approx((float(seed0[key]) + float(seed1[key])) / 2, abs=0.01)
        assert [float(v) for v in both[f"per seed: {key}"].split(" / ")] == [float(seed0[key]), float(seed1[key])]
    assert "seeds 0, 1 (their mean" in (tmp_path / "seeds" / "guidance_sweep.md").read_text()


def test_guidance_sweep_runs_every_setting_once_per_seed_and_averages(tiny_exports):
    """Which seed each evaluation gets (the tiny model's scores hardly move with it): a judge that records its calls
    and scores by seed."""
    spec = importlib.util.spec_from_file_location("guidance_sweep", ROOT / "scripts" / "guidance_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    calls = []

    def judge(pipe, cfg_scale, seed, **kw):
        calls.append((cfg_scale, seed))
        return {"fid_classifier": 10.0 + seed, "class_accuracy": 0.5 + seed / 10}

    args = mock.Mock(model=str(tiny_exports / "ldm_f8"), guide=None, scales=[1.0, 3.0], intervals=[None],
                     rescales=[0.0], autoguidance=[1.0], sigma_rels=[], skip_export_ema=False, seeds=[0, 2],
                     seed=0, sampler="dpmpp_2m", steps=2)
    with mock.patch.object(sweep, "judge_from_args", return_value=judge):
        rows = sweep.sweep(args)
    assert calls == [(1.0, 0), (1.0, 2), (3.0, 0), (3.0, 2)]
    assert [(r["fid_classifier"], r["class_accuracy"]) for r in rows] == [(11.0, 60.0)] * 2
    assert rows[0]["per seed: fid_classifier"] == "10 / 12" and rows[0]["per seed: class_accuracy"] == "50 / 70"


def test_ablation_findings_state_the_trend_and_refuse_noise():
    spec = importlib.util.spec_from_file_location("ablation_report", ROOT / "scripts" / "ablation_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    rows = [{"f": 4, "PSNR": 29.3, "FID": 62.0, "class acc %": 74.0}, {"f": 8, "PSNR": 25.1, "FID": 40.6,
            "class acc %": 78.0}, {"f": 16, "PSNR": 21.4, "FID": 92.1, "class acc %": 15.0}]
    notes, informative = report.findings(rows, chance=10.0)
    assert informative and "PSNR falls monotonically" in notes[0]
    assert any("f=16: samples near chance" in n for n in notes) and any("f=8 (40.6)" in n for n in notes)
    noise = [dict(r, **{"class acc %": a}) for r, a in zip(rows, (8.2, 10.3, 7.4), strict=True)]
    noise[1]["PSNR"] = 30.0
    notes, informative = report.findings(noise, chance=10.0)
    assert not informative and "does NOT fall" in notes[0] and "too short" in notes[1]
    assert report.generation_columns([{"fid": 40.0, "class_accuracy": 0.75}, {"fid": 44.0, "class_accuracy": 0.8}]) \
        == {"FID": 42.0, "FID spread": 4.0, "FID per seed": "40.00 / 44.00", "class acc %": 77.5,
            "class acc % spread": 5.0, "class acc % per seed": "75.0 / 80.0"}


def test_per_class_accuracy_script(tiny_exports, classifier_dir, tmp_path):
    res = _script("scripts/class_accuracy.py", "--model", str(tiny_exports / "ldm_f8"), "--classifier",
                  str(classifier_dir), "--per-class", "1", "--steps", "2", "--out", str(tmp_path / "acc.md"))
    assert res.returncode == 0, res.stderr[-3000:]
    table = (tmp_path / "acc.md").read_text()
    assert "| cfg scale | all | t-shirt |" in table and "ankle boot" in table


def test_demo_closing_table_judges_samples_and_real_images(tiny_exports, data_dir, classifier_dir, tmp_path):
    """The demo's last part: per-class accuracy of samples, the judge's own accuracy on real images, and FID."""
    from ldm.demo.plan import Settings
    from tests.conftest import compose_cfg, tiny_overrides

    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    ae_cfg = compose_cfg(["experiment=ae_f8", *tiny_overrides(tmp_path, data_dir)])
    table, fid = demo.closing_evaluation(tiny_exports / "ldm_f8", classifier_dir, ae_cfg,
                                         Settings(judge_per_class=2, sampling_steps=2))
    lines = table.splitlines()
    assert lines[-5].startswith("| judged | FID | all | t-shirt |") and "ankle boot" in lines[-5]
    assert lines[-3].startswith("| samples at the defaults: cfg 5, guidance where sigma is in (0.5, 3] |")
    assert lines[-2].startswith("| samples, cfg 1.5 at every step (the cfg-only sweep's lowest FID) |")
    assert lines[-1].startswith("| real test images |")
    assert float(lines[-3].split("|")[2]) == pytest.approx(fid, abs=0.05)  # the defaults' FID is the one returned
    assert fid >= 0 and fid < float("inf")

    # A model exported with its guide (here the model itself, which reads the same latents): the defaults are
    # autoguidance's, and the table adds the defaults without the guide.
    shutil.copytree(tiny_exports / "ldm_f8", tmp_path / "ldm_f8")
    shutil.copytree(tiny_exports / "ldm_f8", tmp_path / "ldm_f8" / "guide")
    table, fid = demo.closing_evaluation(tmp_path / "ldm_f8", classifier_dir, ae_cfg,
                                         Settings(judge_per_class=2, sampling_steps=2))
    lines = table.splitlines()
    assert lines[-4].startswith(f"| samples at the defaults: autoguidance 2.5 by {tmp_path / 'ldm_f8' / 'guide'}, "
                                "cfg 3.5, guidance where sigma is in (0.5, 3] |")
    assert lines[-3].startswith("| samples without the guide: cfg 5, guidance where sigma is in (0.5, 3] (the "
                                "defaults without one) |")
    assert lines[-2].startswith("| samples, cfg 1.5 at every step") and lines[-1].startswith("| real test images |")
    assert float(lines[-4].split("|")[2]) == pytest.approx(fid, abs=0.05)


def test_accuracy_by_class_counts_each_class_apart():
    from ldm.evaluation.samples import accuracy_by_class

    labels = torch.tensor([0, 0, 1, 1, 1, 9])
    pred = torch.tensor([0, 1, 1, 1, 0, 9])
    acc = accuracy_by_class(pred, labels)
    assert acc["all"] == pytest.approx(4 / 6) and acc["t-shirt"] == 0.5 and acc["trouser"] == pytest.approx(2 / 3)
    assert acc["ankle boot"] == 1.0 and "bag" not in acc


def test_sample_metric_callbacks_take_their_reference_images_from_the_datamodule(make_ldm_cfg, make_cfg):
    """FID/CLIP read their reference set through the DataModule (data.reference_shards: for a latent cache, the
    images it was encoded from), never by building a loader of their own."""
    import inspect

    import ldm.callbacks.sample_metrics as sample_metrics
    from ldm.training import build

    assert "ldm.data" not in inspect.getsource(sample_metrics)
    cfg = make_ldm_cfg("ldm_f8")
    assert cfg.data.reference_shards == f"{cfg.data.prepare.image_prepare.out_dir}/val"
    assert make_cfg("ae_f8").data.reference_shards == make_cfg("ae_f8").data.val_shards
    datamodule = build(cfg.data)
    datamodule.data.prepare_fn = None  # the image shards exist (session data): no latent cache needed here
    images = [b for b in datamodule.reference_dataloader(TINY_RES, 4, 6)]
    assert sum(len(b["image"]) for b in images) == 6 and images[0]["image"].shape[1:] == (3, TINY_RES, TINY_RES)
    assert all(b["caption"] for b in images)
    datamodule.reference_shards = None
    with pytest.raises(ValueError, match="data.reference_shards is not set"):
        datamodule.reference_dataloader(TINY_RES, 4, 6)
