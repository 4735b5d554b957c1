"""WebDataset-style tar shards and the Parquet manifest / quarantine tables.

A shard ``shard-000000.tar`` holds, per sample key, ``KEY.png`` (the image; ``.jpg``/``.webp``
keep their encoding; an image normalised to RGB keeps its input bytes as ``KEY.orig``),
``KEY.txt`` (the long caption, UTF-8) and ``KEY.json`` (metadata, e.g. the shapes-world
scene). Members
are written in key order with fixed mtimes and owners, so the same samples give the same
bytes (and the same DVC hash). The manifest has one row per valid sample; the quarantine
table has one row per rejected input, with its reasons and its original bytes.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lens_model import atomic

SHARD_NAME = "shard-{:06d}.tar"
DECODED_IMAGE_EXTS = ("png", "jpg", "webp")  # members the loader reads
IMAGE_EXTS = (*DECODED_IMAGE_EXTS, "bin")  # "bin": bytes that did not decode as an image
ORIGINAL_EXT = "orig"  # the input's own bytes, where the image member is a re-encoding
MANIFEST = "manifest.parquet"
QUARANTINE = "quarantine.parquet"

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),
    ("caption", pa.string()),
    ("short_caption", pa.string()),  # optional short alternative, for caption mixing
    ("word_count", pa.int32()),
    ("token_count", pa.int32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("area", pa.int64()),
    ("aspect", pa.float32()),
    ("bucket", pa.string()),
    ("sha256", pa.string()),
    ("source", pa.string()),
    ("decodable", pa.bool_()),
    ("blur", pa.float32()),
    ("entropy", pa.float32()),
    ("luminance", pa.float32()),
    ("meta", pa.string()),
])

# Rows after prepare, before the contract: the manifest's columns plus why decoding failed.
CANDIDATE_SCHEMA = MANIFEST_SCHEMA.append(pa.field("decode_error", pa.string()))

QUARANTINE_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source", pa.string()),
    ("reasons", pa.list_(pa.string())),
    ("detail", pa.string()),
    ("stage", pa.string()),
    ("image_bytes", pa.binary()),
    ("caption_bytes", pa.binary()),
])

Sample = tuple[str, dict[str, bytes]]  # (key, {"png": ..., "txt": ..., "json": ...})


def shard_name(index: int) -> str:
    return SHARD_NAME.format(index)


def write_shard(path: str | Path, samples: Iterable[Sample]) -> None:
    """Write ``samples`` as one tar shard, atomically and byte-reproducibly."""
    with (atomic.atomic_path(path) as tmp,
          tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar):
        for key, parts in samples:
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} may not contain '.' or '/'")
            for ext in sorted(parts):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(parts[ext]), 0, 0o644
                tar.addfile(info, io.BytesIO(parts[ext]))


def iter_shard(path: str | Path) -> Iterator[Sample]:
    """Yield ``(key, {ext: bytes})`` groups from a shard written by :func:`write_shard`."""
    key, parts = None, {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, _, ext = member.name.partition(".")
            if k != key and key is not None:
                yield key, parts
                parts = {}
            key = k
            fh = tar.extractfile(member)
            parts[ext] = fh.read() if fh else b""
    if key is not None:
        yield key, parts


def index_shard(path: str | Path) -> dict[str, dict[str, tuple[int, int]]]:
    """``{key: {ext: (data_offset, size)}}`` for random access with :func:`read_member`."""
    index: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.isfile():
                k, _, ext = member.name.partition(".")
                index.setdefault(k, {})[ext] = (member.offset_data, member.size)
    return index


def read_member(fh: io.BufferedReader, offset: int, size: int) -> bytes:
    fh.seek(offset)
    return fh.read(size)


def image_member(members: dict[str, tuple[int, int]]) -> str | None:
    """The extension of a sample's decodable image member, if it has one."""
    return next((e for e in DECODED_IMAGE_EXTS if e in members), None)


def write_table(path: str | Path, rows: list[dict], schema: pa.Schema) -> None:
    """Write ``rows`` (dicts keyed by the schema's columns) as Parquet, atomically."""
    table = pa.Table.from_pylist(rows, schema=schema)
    atomic.write_with(path, lambda tmp: pq.write_table(table, tmp))


def write_arrow(path: str | Path, table: pa.Table) -> None:
    atomic.write_with(path, lambda tmp: pq.write_table(table, tmp))
