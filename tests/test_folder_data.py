"""A user's own data in: class folders (ImageNet's layout) and caption tables become shards in parallel and
resumably, and img2dataset's webdataset output trains as it is."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import ldm.data.folder as folder_module
from ldm.data.folder import CLASS_INDEX, folder_to_shards, read_caption_table
from ldm.data.loaders import ShardData
from tests.conftest import ROOT, TINY_RES, compose_cfg, ldm_overrides, tiny_overrides
from tests.script_runner import run_script
from tests.synthetic_data import CLASSES, img2dataset_shards


def _labels_by_key(shards: list) -> dict[str, int]:
    data = ShardData(train_shards=[str(p) for p in shards], val_shards=[str(p) for p in shards], resolution=16,
                     num_workers=0, val_batch_size=100, required_keys=("image", "class_label"))
    batches = list(data.val_dataloader())
    return {k: int(c) for b in batches for k, c in zip(b["key"], b["class_label"], strict=True)}


def test_class_folders_become_labelled_shards_in_parallel_with_the_class_map_beside_them(imagenet_layout, tmp_path):
    result = folder_to_shards(imagenet_layout, tmp_path / "shards", resolution=24, samples_per_shard=3, workers=2,
                              labels="folders")
    assert result.classes == CLASSES
    assert json.loads((tmp_path / "shards" / CLASS_INDEX).read_text()) == {"names": CLASSES}
    assert result.written == 5 and result.images == 12 and result.kept == 0  # 13 files, 3 per shard
    assert list(result.skipped) == [str(imagenet_layout / CLASSES[1] / "corrupt.png")]
    assert "not a readable image" in result.skipped[str(imagenet_layout / CLASSES[1] / "corrupt.png")]
    labels = _labels_by_key(result.shards)
    assert len(labels) == 12
    for key, label in labels.items():
        assert key.startswith(CLASSES[label] + "__"), (key, label)
    counts = json.loads((tmp_path / "shards" / "shards.json").read_text())
    assert sum(counts.values()) == 12 and set(counts) == {p.name for p in result.shards}


def test_an_interrupted_conversion_resumes_without_rewriting_finished_shards(imagenet_layout, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    original = folder_module.sample_record
    calls = {"n": 0}

    def interrupted(sample):  # the conversion dies while writing its third shard
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return original(sample)

    monkeypatch.setattr(folder_module, "sample_record", interrupted)
    with pytest.raises(KeyboardInterrupt):
        folder_to_shards(imagenet_layout, out, samples_per_shard=3, labels="folders", workers=1)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    # The shards before the one that was being written are complete; that one is not there, nor any partial file
    # (shards queued behind it may have been finished too).
    assert {"data-000000.tar", "data-000001.tar"} <= set(finished) and "data-000002.tar" not in finished
    assert not list(out.glob("*.tmp"))
    monkeypatch.setattr(folder_module, "sample_record", original)
    result = folder_to_shards(imagenet_layout, out, samples_per_shard=3, labels="folders", workers=2)
    assert result.kept == len(finished) and result.written == 5 - len(finished) and len(result.shards) == 5
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == finished  # untouched
    assert len(_labels_by_key(result.shards)) == 12
    again = folder_to_shards(imagenet_layout, out, samples_per_shard=3, labels="folders")
    assert (again.kept, again.written) == (5, 0)
    # Another conversion into the same folder (an image added; another shard size) is refused, nothing touched.
    Image.new("RGB", (30, 30)).save(imagenet_layout / CLASSES[0] / "added.png")
    with pytest.raises(ValueError, match=r"holds shards of another conversion \(the image files differ"):
        folder_to_shards(imagenet_layout, out, samples_per_shard=3, labels="folders")
    with pytest.raises(ValueError, match=r"another conversion \(.*samples_per_shard differ"):
        folder_to_shards(imagenet_layout, out, samples_per_shard=4, labels="folders")
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == finished


def test_captions_from_a_metadata_table_then_txt_then_json(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for name in ("000001", "000002", "000003", "000004"):
        Image.new("RGB", (20, 20), "white").save(root / f"{name}.jpg")
    (root / "000002.txt").write_text("from the txt file\n")
    (root / "000003.json").write_text(json.dumps({"caption": "from the json file", "width": 20}))
    table = tmp_path / "meta.jsonl"
    table.write_text("\n".join(json.dumps({"key": "000001", "caption": "from the table", "url": "http://x"})
                               for _ in range(1)) + "\n")
    result = folder_to_shards(root, tmp_path / "shards", captions=table, default_caption="none")
    data = ShardData(train_shards=str(tmp_path / "shards"), val_shards=str(tmp_path / "shards"), resolution=20,
                     num_workers=0, required_keys=("image", "caption"))
    captions = {k: c for b in data.val_dataloader() for k, c in zip(b["key"], b["caption"], strict=True)}
    assert captions == {"000001": "from the table", "000002": "from the txt file", "000003": "from the json file",
                        "000004": "none"}
    assert result.images == 4
    csv_table = tmp_path / "meta.csv"
    csv_table.write_text("filename,text\n000004.jpg,from a csv\n")
    assert read_caption_table(csv_table) == {"000004.jpg": "from a csv"}
    bad = tmp_path / "bad.csv"
    bad.write_text("url,width\nhttp://x,3\n")
    with pytest.raises(ValueError, match=r"bad.csv: expected a key column .* found \['url', 'width'\]"):
        read_caption_table(bad)


def test_the_script_converts_and_ends_a_mistake_in_one_line(imagenet_layout, tmp_path):
    res = run_script(ROOT / "scripts" / "folder_to_shards.py", str(imagenet_layout), str(tmp_path / "out"),
                     "--labels", "folders", "--workers", "2", "--samples-per-shard", "5", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "3 shards: 3 written (12 images), 0 kept from an earlier run; 1 files skipped: corrupt.png" in res.stdout
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "a.png")
    res = run_script(ROOT / "scripts" / "folder_to_shards.py", str(loose), str(tmp_path / "out2"), "--labels",
                     "folders", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "a.png is not inside a class folder" in res.stderr


@pytest.mark.slow
def test_img2dataset_shards_train_both_stages_as_they_are(tmp_path, data_dir, export_dir):
    from ldm.training import train

    shards = tmp_path / "laion"
    img2dataset_shards(shards)
    spec = str(shards)  # a folder of shards (braces and lists work too)
    common = [o for o in tiny_overrides(tmp_path, data_dir) if not o.startswith(("data.", "+data."))]
    ae = compose_cfg(["experiment=ae_f8", *common, "data=webdataset", f"data.train_shards={spec}",
                      f"data.val_shards={spec}", f"data.resolution={TINY_RES}", "data.batch_size=4",
                      "data.val_batch_size=8", "data.num_workers=0", "data.samples_per_epoch=16", "data.val_limit=8",
                      "data.shuffle_buffer=8", "trainer.max_steps=2", f"paths.output_dir={tmp_path}/ae",
                      f"callbacks.export_first_stage.dirpath={tmp_path}/exports/ae_laion"])
    train(ae)
    assert torch.load(tmp_path / "ae" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    ldm_common = [o for o in ldm_overrides(tmp_path, data_dir, export_dir)
                  if not o.startswith(("data.", "+data.", "experiment=", "paths.export_dir"))]
    ldm = compose_cfg(["experiment=ldm_f8", *ldm_common, "data=webdataset",
                       f"data.train_shards={spec}", f"data.val_shards={spec}", f"data.resolution={TINY_RES}",
                       "data.required_keys=[image,caption]", "data.num_workers=0", "data.samples_per_epoch=16",
                       "data.val_limit=8", "data.shuffle_buffer=8", "data.val_batch_size=8",
                       f"model.first_stage={tmp_path}/exports/ae_laion", "trainer.max_steps=2",
                       f"paths.output_dir={tmp_path}/ldm", f"callbacks.export_pipeline.dirpath={tmp_path}/exports/l",
                       "callbacks.image_logger=null"])
    train(ldm)
    assert torch.load(tmp_path / "ldm" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.slow
def test_class_folders_train_class_conditional_stage_two_through_train_py_and_sample_by_class_name(
        imagenet_layout, tmp_path, data_dir, export_dir):
    shards = tmp_path / "shards"
    folder_to_shards(imagenet_layout, shards, resolution=TINY_RES, samples_per_shard=4, labels="folders", workers=2)
    overrides = [o for o in ldm_overrides(tmp_path, data_dir, export_dir, "ldm_f8", "model/conditioner=class")
                 if not o.startswith(("data.", "+data.", "paths.output_dir", "model.sampling.prompts"))]
    res = run_script(ROOT / "train.py", *overrides, "data=webdataset", f"data.train_shards={shards}",
                     f"data.val_shards={shards}", f"data.resolution={TINY_RES}", "data.batch_size=4",
                     "data.val_batch_size=4", "data.num_workers=0", "data.samples_per_epoch=8", "data.val_limit=4",
                     "data.shuffle_buffer=4", "data.required_keys=[image,class_label]",
                     "model.conditioner.embedders.0.num_classes=3", "trainer.max_steps=3",
                     f"paths.output_dir={tmp_path}/run", f"hydra.run.dir={tmp_path}/run",
                     f"callbacks.export_pipeline.dirpath={tmp_path}/exports/imagenet", "callbacks.image_logger=null",
                     cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    export = tmp_path / "exports" / "imagenet"
    res = run_script(ROOT / "sample.py", f"model_path={export}", f"class_labels=[{CLASSES[1]},{CLASSES[2]}]",
                     "steps=2", "num_images=1", f"out_dir={tmp_path}/samples", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "samples").glob("0*.png")) == [f"0000_{CLASSES[1]}.png",
                                                                             f"0001_{CLASSES[2]}.png"]
    res = run_script(ROOT / "sample.py", f"model_path={export}", "class_labels=[tench]", "steps=2", cwd=tmp_path)
    assert res.returncode == 2 and f"unknown class 'tench'; expected one of {CLASSES}" in res.stderr
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(export)
    torch.testing.assert_close(pipe(class_labels=CLASSES[2], steps=2, seed=3, output_type="tensor"),
                               pipe(class_labels=2, steps=2, seed=3, output_type="tensor"))
