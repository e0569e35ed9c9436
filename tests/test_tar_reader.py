"""The shard reader: the same samples as webdataset's tarfile-based reader, for every tar tarfile reads."""

import gzip
import io
import tarfile

import pytest
import webdataset as wds

import ldm.data.tar_reader as tar_reader
from ldm.data.shards import write_records
from ldm.data.tar_reader import iter_members, tar_samples

RECORDS = [{"__key__": f"s{i:03d}", "npy": bytes([i]) * (100 + 37 * i), "txt": f"caption {i}", "cls": str(i % 3)}
           for i in range(12)]


def _samples(url: str, expander) -> list[dict]:
    pipeline = wds.DataPipeline(wds.SimpleShardList([url]), expander(handler=wds.reraise_exception))
    return [{k: v for k, v in s.items() if k != "__local_path__"} for s in pipeline]


def _tar(members: list[tuple[str, bytes]], fmt: int, with_dir: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if with_dir:
            info = tarfile.TarInfo("somedir")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_our_shards_read_as_webdataset_reads_them_without_tarfile(tmp_path, monkeypatch):
    """Shards from our writer: identical samples to webdataset.tarfile_to_samples, and every header is
    parsed on the fast path (tarfile is never called)."""
    shard = write_records(RECORDS, tmp_path, "train", samples_per_shard=100)[0]
    expected = _samples(str(shard), wds.tarfile_to_samples)
    assert len(expected) == len(RECORDS)

    def no_tarfile(stream):
        raise AssertionError("fell back to tarfile on a plain ustar shard")

    monkeypatch.setattr(tar_reader, "_with_tarfile", no_tarfile)
    assert _samples(str(shard), tar_samples) == expected


LONG = "d" * 60 + "/" + "x" * 90 + ".npy"  # > 100 characters: ustar prefix field, pax or GNU long name


@pytest.mark.parametrize("fmt,with_dir,names", [
    (tarfile.USTAR_FORMAT, True, ["a.npy", LONG]),
    (tarfile.PAX_FORMAT, False, ["a.npy", "b" * 120 + ".npy", "é-caption.txt"]),
    (tarfile.GNU_FORMAT, True, ["a.npy", "c" * 150 + ".npy"]),
])
def test_every_header_format_gives_tarfiles_members(fmt, with_dir, names):
    members = [(name, f"data of {name}".encode() * 3) for name in names]
    assert list(iter_members(io.BytesIO(_tar(members, fmt, with_dir)))) == members


def test_an_old_style_directory_entry_is_not_a_member():
    """v7 tars mark a directory as a regular-file type whose name ends in '/'; tarfile skips it, so do we."""
    data = bytearray(_tar([("olddir/", b""), ("a.txt", b"hello")], tarfile.USTAR_FORMAT))
    data[156:157] = b"\0"  # the first header's type: AREGTYPE
    data[148:156] = b"%06o\0 " % (sum(data[:148]) + 256 + sum(data[156:512]))
    assert [m.name for m in tarfile.open(fileobj=io.BytesIO(bytes(data))) if m.isreg()] == ["a.txt"]
    assert list(iter_members(io.BytesIO(bytes(data)))) == [("a.txt", b"hello")]


def test_compressed_and_empty_streams():
    members = [("a.txt", b"hello"), ("b.txt", b"world" * 200)]
    assert list(iter_members(io.BytesIO(gzip.compress(_tar(members, tarfile.USTAR_FORMAT))))) == members
    assert list(iter_members(io.BytesIO(b""))) == []


def test_a_truncated_member_is_an_error_naming_it():
    data = _tar([("a.txt", b"x" * 1000), ("b.txt", b"y" * 3000)], tarfile.USTAR_FORMAT)
    members = iter_members(io.BytesIO(data[:512 * 5]))  # a's header + 2 blocks, b's header + 1 of 6 blocks
    assert next(members) == ("a.txt", b"x" * 1000)
    with pytest.raises(tarfile.ReadError, match=r"unexpected end of data in member 'b.txt' \(512 of 3000 bytes\)"):
        next(members)


def test_a_bad_shard_goes_to_the_handler_with_its_url(tmp_path):
    """A truncated shard yields its complete samples, then the handler gets an error naming the shard;
    a corrupt header (bad checksum) is tarfile's error, also with the url."""
    shard = write_records(RECORDS, tmp_path, "train", samples_per_shard=100)[0]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2 + 100])
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x01" * 2048)
    errors = []
    for url, least in ((cut, 1), (junk, 0)):
        errors.clear()
        pipeline = wds.DataPipeline(wds.SimpleShardList([str(url)]),
                                    tar_samples(handler=lambda err: errors.append(err) or True))
        samples = list(pipeline)
        assert len(samples) >= least and all(s["__key__"] in {r["__key__"] for r in RECORDS} for s in samples)
        assert len(errors) == 1 and str(url) in str(errors[0])
