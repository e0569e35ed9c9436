"""Shards: writing, reading back, bad input, the built-in dataset and the folder converter."""

import gzip
import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ldm.data.decode import BadSample, SampleDecoder, SkipCounter, decode_latent
from ldm.data.fashion_mnist import CLASS_NAMES, caption_for, prepare, read_idx
from ldm.data.folder import folder_to_shards
from ldm.data.loaders import ShardData, expand_urls
from ldm.data.shards import Sample, write_shards


def _samples(n: int, prefix: str = "s", res: int = 16) -> list[Sample]:
    rng = np.random.default_rng(0)
    return [Sample(key=f"{prefix}{i:04d}", image=Image.fromarray(rng.integers(0, 256, (res, res, 3), np.uint8)),
                   caption=f"caption {prefix}{i}", label=i % 10) for i in range(n)]


def _val_keys(dm: ShardData) -> list[str]:
    return [k for batch in dm.val_dataloader() for k in batch["key"]]


def test_shard_round_trip_is_exact(tmp_path):
    samples = _samples(10)
    shards = write_shards(samples, tmp_path, "val", samples_per_shard=4)
    assert [p.name for p in shards] == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    assert not list(tmp_path.glob("*.tmp"))
    with tarfile.open(shards[0]) as tar:  # one plain header per member: no pax headers (they slow reading)
        assert all(not m.pax_headers and isinstance(m.mtime, int) for m in tar.getmembers())
    dm = ShardData(train_shards=str(tmp_path), val_shards=str(tmp_path), resolution=16, val_batch_size=3,
                       num_workers=0, required_keys=("image", "caption", "class_label"))
    batches = list(dm.val_dataloader())
    images = torch.cat([b["image"] for b in batches])
    assert images.shape == (10, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    expected = torch.stack([torch.from_numpy(np.array(s.image)).permute(2, 0, 1).float() / 127.5 - 1
                            for s in samples])
    torch.testing.assert_close(images, expected)
    assert [c for b in batches for c in b["caption"]] == [s.caption for s in samples]
    assert torch.cat([b["class_label"] for b in batches]).tolist() == [s.label for s in samples]


@pytest.mark.parametrize("n_shards,world,workers", [(4, 2, 0), (3, 2, 0), (1, 2, 0), (1, 3, 2), (2, 4, 0), (4, 2, 2),
                                                     (2, 2, 2)])
def test_validation_split_over_ranks_gives_every_rank_data_and_every_sample_once(tmp_path, n_shards, world,
                                                                                  workers):
    """By shard when there are enough shards, else by sample: never a rank without validation data (under
    DDP such a rank would leave the others waiting at the epoch-end metric reduction)."""
    n = 4 * n_shards
    write_shards(_samples(n, res=8), tmp_path, "val", samples_per_shard=4)
    dm = ShardData(train_shards=str(tmp_path), val_shards=str(tmp_path), resolution=8, val_batch_size=3,
                   num_workers=workers)
    per_rank = [[k for b in dm.val_dataloader(world, rank) for k in b["key"]] for rank in range(world)]
    assert all(per_rank), [len(keys) for keys in per_rank]
    assert sorted(k for keys in per_rank for k in keys) == [f"s{i:04d}" for i in range(n)]
    if n_shards >= world * max(1, workers):  # whole shards per rank
        assert all(len(keys) == 4 * len({int(k[1:]) // 4 for k in keys}) for keys in per_rank)


@pytest.mark.parametrize("key,value", [("batch_size", 0), ("batch_size", -4), ("val_batch_size", 0),
                                       ("num_workers", -1), ("samples_per_epoch", 0), ("val_limit", -5),
                                       ("val_limit", 0), ("shuffle_buffer", 0), ("resolution", 0), ("batch_size", 2.5),
                                       ("kind", "latents")])
def test_bad_loader_settings_name_the_key_and_what_was_expected(tmp_path, key, value):
    with pytest.raises(ValueError, match=rf"data\.{key}={value!r}: expected"):
        ShardData(train_shards=str(tmp_path), **{key: value})


def test_val_limit_counts_every_worker_when_shards_are_fewer_than_workers(tmp_path):
    write_shards(_samples(8, res=8), tmp_path, "val", samples_per_shard=8)  # one shard, two workers
    dm = ShardData(train_shards=str(tmp_path), val_shards=str(tmp_path), resolution=8, val_batch_size=3,
                   num_workers=2, val_limit=6)
    keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert len(keys) == 6 and len(set(keys)) == 6  # 3 per worker, none idle
    few = ShardData(train_shards=str(tmp_path), val_shards=str(tmp_path), resolution=8, num_workers=0, val_limit=1)
    per_rank = [[k for b in few.val_dataloader(2, rank) for k in b["key"]] for rank in range(2)]
    assert per_rank == [["s0000"], ["s0001"]]  # val_limit below the rank count: still one sample per rank


def test_train_loader_batches_per_epoch_and_augmentations(tmp_path):
    write_shards(_samples(20, res=20), tmp_path, "train", samples_per_shard=5)
    dm = ShardData(train_shards=f"{tmp_path}/train-{{000000..000003}}.tar", resolution=16, batch_size=4,
                       num_workers=0, samples_per_epoch=24, random_crop=True, hflip=True, shuffle_buffer=10)
    batches = list(dm.train_dataloader())
    assert len(batches) == 6  # samples_per_epoch / batch_size, from resampled shards
    assert all(b["image"].shape == (4, 3, 16, 16) for b in batches)


def test_expand_urls_forms_and_errors(tmp_path):
    write_shards(_samples(4), tmp_path, "x", samples_per_shard=2)
    a = expand_urls(str(tmp_path))
    b = expand_urls(f"{tmp_path}/x-{{000000..000001}}.tar")
    c = expand_urls([f"{tmp_path}/x-000000.tar", f"{tmp_path}/x-000001.tar"])
    assert a == b == c
    with pytest.raises(FileNotFoundError, match="data.val_shards.*do not exist"):
        expand_urls(f"{tmp_path}/y-{{000000..000001}}.tar", "data.val_shards")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        expand_urls(str(empty))


def _corrupt_set(tmp_path: Path) -> tuple[list[str], set[str]]:
    """Three good shards, a truncated one, one with an undecodable image and a missing key, and junk."""
    good = write_shards(_samples(12, "good"), tmp_path / "good", "g", samples_per_shard=4)
    good_keys = {f"good{i:04d}" for i in range(12)}
    bad_dir = tmp_path / "bad"
    trunc_src = write_shards(_samples(4, "trunc"), bad_dir, "t", samples_per_shard=4)[0]
    data = trunc_src.read_bytes()
    trunc_src.write_bytes(data[: len(data) // 2 + 100])
    mixed = bad_dir / "mixed.tar"
    with wds.TarWriter(str(mixed)) as w:
        w.write({"__key__": "broken_png", "png": b"not a png at all", "txt": "x", "cls": "1"})
        w.write({"__key__": "no_label", "png": _png(), "txt": "x"})
        w.write({"__key__": "mixed_ok", "png": _png(), "txt": "fine", "cls": "2"})
    good_keys.add("mixed_ok")
    junk = bad_dir / "junk.tar"
    junk.write_bytes(b"\x00garbage" * 100)
    urls = [str(good[0]), str(trunc_src), str(good[1]), str(mixed), str(junk), str(good[2])]
    return urls, good_keys


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_corrupt_shards_lose_no_good_sample_and_are_counted(tmp_path, caplog):
    urls, good_keys = _corrupt_set(tmp_path)
    dm = ShardData(train_shards=urls, val_shards=urls, resolution=16, val_batch_size=4, num_workers=0,
                       required_keys=("image", "caption", "class_label"))
    with caplog.at_level(logging.WARNING):
        keys = _val_keys(dm)
    assert good_keys <= set(keys)  # every good sample arrives (truncated shard's early samples may too)
    assert "broken_png" not in keys and "no_label" not in keys
    counts = dm.skipped()
    assert counts["val_skipped"] >= 4  # truncated tar, broken png, missing label, junk tar
    text = caplog.text
    assert "broken_png" in text and "undecodable png" in text
    assert "no_label" in text and "missing class key 'cls'" in text
    assert "junk.tar" in text


def test_nothing_valid_is_a_clear_error_not_a_hang(tmp_path):
    junk = tmp_path / "junk-000000.tar"
    junk.write_bytes(b"\x00garbage" * 100)
    dm = ShardData(train_shards=str(junk), resolution=16, batch_size=2, num_workers=0,
                       max_consecutive_errors=50)
    with pytest.raises(RuntimeError, match="no valid one"):
        next(iter(dm.train_dataloader()))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_prepare_from_a_source_dir_is_atomic_and_reused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 10), ("t10k", 6)):
        _write_idx(src / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(src / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    out = prepare(tmp_path / "out", resolution=32, source_dir=src, samples_per_shard=4)
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == [f"train-00000{i}.tar" for i in range(3)]
    assert len(list((out / "val").glob("*.tar"))) == 2 and not list(out.rglob("*.tmp"))
    dm = ShardData(train_shards=str(out / "train"), val_shards=str(out / "val"), resolution=32,
                       num_workers=0, val_batch_size=10)
    (batch,) = list(dm.val_dataloader())
    assert batch["caption"][3] == "a photo of a dress" and batch["class_label"].tolist() == list(range(6))
    stamp = (out / "train" / "train-000000.tar").stat().st_mtime_ns
    prepare(tmp_path / "out", resolution=32, source_dir=src, samples_per_shard=4)
    assert (out / "train" / "train-000000.tar").stat().st_mtime_ns == stamp  # reused, not rewritten


def test_read_idx_rejects_a_bad_file(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="header says"):
        read_idx(bad)


def test_captions_use_the_class_names():
    assert len(CLASS_NAMES) == 10
    assert caption_for(7) == "a photo of a sneaker"
    assert caption_for(9) == "a photo of an ankle boot"


def test_folder_to_shards_with_captions(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(folder / "a.png")
    (folder / "a.txt").write_text("a red square\n")
    Image.new("RGB", (30, 40), (0, 255, 0)).save(folder / "sub" / "b.jpg")
    (folder / "broken.png").write_bytes(b"nope")
    result = folder_to_shards(folder, tmp_path / "shards", resolution=24)
    assert len(result.shards) == 1 and list(result.skipped) == [str(folder / "broken.png")]
    dm = ShardData(train_shards=str(tmp_path / "shards"), val_shards=str(tmp_path / "shards"),
                       resolution=24, num_workers=0)
    (batch,) = list(dm.val_dataloader())
    assert batch["caption"] == ["a red square", ""] and batch["image"].shape == (2, 3, 24, 24)
    assert batch["class_label"].tolist() == [-1, -1]


@pytest.mark.parametrize("array", [np.random.default_rng(0).standard_normal((8, 4, 4)).astype(np.float16),
                                   np.arange(24, dtype=np.float32).reshape(2, 3, 4),
                                   np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
                                   np.float16(2.5)])
def test_latent_records_decode_as_np_load(array):
    """The parsed-once .npy header path (and its np.load fallback, e.g. Fortran order) read what np.save wrote."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    for _ in range(2):  # the second read reuses the parsed header
        out = decode_latent(buf.getvalue())
        assert out.dtype == torch.float32 and out.shape == array.shape
        np.testing.assert_array_equal(out.numpy(), array.astype(np.float32))


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:-10], "buffer is smaller"),                                # truncated array
    (lambda d: d[:10] + b"{not a dict" + d[21:], "Cannot parse header"),     # corrupt header
    (lambda d: d[:8] + b"\xff\xff" + d[10:], "reading array header"),       # header length past the end
])
def test_damaged_latent_record_is_a_bad_sample_naming_its_key(damage, message):
    buf = io.BytesIO()
    np.save(buf, np.ones((8, 4, 4), np.float16), allow_pickle=False)
    decoder = SampleDecoder(None, SkipCounter(10), required=(), kind="latent")
    with pytest.raises(BadSample, match=f"shard s.tar key k1: undecodable latent.npy .*{message}"):
        decoder({"__key__": "k1", "__url__": "s.tar", "latent.npy": damage(buf.getvalue())})
