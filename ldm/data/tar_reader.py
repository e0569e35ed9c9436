"""Reading webdataset shards: tar members -> samples, with a fast path for plain ustar headers.

Python's ``tarfile`` spends ~70 us per member parsing and validating a header in pure Python; a latent
record is four small members, so with the cores busy computing (no loader workers) that parse was most
of the time stage 2 spent reading its cache. ``iter_members`` reads the plain ustar/v7 headers our
shard writers produce (and most tools write) directly - name, size, checksum - and hands everything
else (pax or GNU extension headers, compressed streams, anything it does not recognise) to ``tarfile``
from that header on, so every tar that ``tarfile`` reads is still read.
``tar_samples`` is a drop-in for ``webdataset.tarfile_to_samples`` built on it.
"""

from __future__ import annotations

import functools
import json
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import webdataset as wds
from webdataset.tariterators import group_by_keys, url_opener

# Per split folder: {shard file name: samples written}, kept by ldm.data.shards.write_records.
SHARD_INDEX = "shards.json"

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")
# Links, devices, directories, FIFOs: no sample data (webdataset skips them too).
NOT_FILES = (b"1", b"2", b"3", b"4", b"5", b"6")
# Members webdataset treats as metadata, not sample fields.
META = re.compile(r"__[^/]*__($|/)")


class _Prepend:
    """A read-only stream: ``head`` bytes, then the rest of ``stream`` (for handing over to tarfile)."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:size], self.head[size:]
        return out + (self.stream.read(size - len(out)) if len(out) < size else b"")


def _plain_header(block: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, typeflag) of a plain ustar/v7 header block, or None if it is anything else."""
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:  # base-256 sizes, garbage: tarfile's business
        return None
    if stored != sum(block[:148]) + 256 + sum(block[156:]):  # checksum with its own field read as spaces
        return None
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0]  # ustar's long-name prefix; joined whenever set, as tarfile does
    if prefix:
        name = prefix + b"/" + name
    try:
        return name.decode("utf-8"), size, block[156:157]
    except UnicodeDecodeError:
        return None


def iter_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file in a tar stream, in order; reads the stream once, never seeks."""
    while True:
        block = stream.read(BLOCK)
        if len(block) == 0 or block == bytes(BLOCK):  # end of archive (or an empty stream)
            return
        header = _plain_header(block) if len(block) == BLOCK else None
        if header is None or header[2] not in REGULAR + NOT_FILES:
            yield from _with_tarfile(_Prepend(block, stream))
            return
        name, size, kind = header
        data = stream.read(size)
        if len(data) < size:
            raise tarfile.ReadError(f"unexpected end of data in member {name!r} ({len(data)} of {size} bytes)")
        pad = -size % BLOCK
        if pad and len(stream.read(pad)) < pad:
            raise tarfile.ReadError(f"unexpected end of data after member {name!r}")
        # A v7 directory entry is a type-"\0" member whose name ends in "/" (tarfile skips it too).
        if kind in REGULAR and not (kind == b"\0" and name.endswith("/")):
            yield name, data


def _with_tarfile(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    archive = tarfile.open(fileobj=stream, mode="r|*")
    for info in archive:
        if info.isreg():
            yield info.name, archive.extractfile(info).read()
        archive.members = []  # a stream of unknown length: keep no index


class IncompleteShard(ValueError):
    """A shard held fewer samples than its writer recorded (or none at all)."""


def recorded_count(url: str) -> int | None:
    """The sample count the framework's writer recorded for a local shard (``shards.json`` beside it), or None."""
    if "://" in url or url.startswith("pipe:"):
        return None
    index = Path(url).parent / SHARD_INDEX
    try:
        stamp = index.stat().st_mtime_ns
    except OSError:
        return None
    return _index(str(index), stamp).get(Path(url).name)


@functools.lru_cache(maxsize=64)
def _index(path: str, stamp: int) -> dict[str, int]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _sample_key(name: str) -> str:
    folder, _, base = name.rpartition("/")
    return f"{folder}/{base.split('.', 1)[0]}"


def expand_tars(sources: Iterable[dict[str, Any]], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Opened shard streams -> member dicts ``{"fname", "data", "__url__"}``, ``{}`` after each shard
    (so that ``group_by_keys`` never joins samples across shards), as ``webdataset.tar_file_expander``.

    A shard that ends with fewer samples than its writer recorded (a tail cut at a member boundary), or with
    none at all (an empty or zero-byte file), goes to the handler as :class:`IncompleteShard` (warned, counted)."""
    for source in sources:
        url = source["url"]
        keys: set[str] = set()
        try:
            for name, data in iter_members(source["stream"]):
                if META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
                    continue
                keys.add(_sample_key(name))
                yield {"fname": name, "data": data, "__url__": url}
            yield {}
            expected = recorded_count(url)
            if not keys or (expected is not None and len(keys) < expected):
                raise IncompleteShard(f"shard holds {len(keys)} samples, its writer recorded "
                                      f"{expected if expected is not None else 'some'}: truncated or emptied")
        except Exception as err:  # noqa: BLE001 - the handler decides (count and skip, or raise)
            err.args = (f"{err.args[0] if err.args else err!r} @ {url}", *err.args[1:])
            if not handler(err):
                return


def _tar_samples(src: Iterable[dict[str, Any]], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    return group_by_keys(expand_tars(url_opener(src, handler=handler), handler), handler=handler)


tar_samples = wds.pipelinefilter(_tar_samples)
