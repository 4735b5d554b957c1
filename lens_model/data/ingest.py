"""Ingest of user data: plan cheap chunk references, then read each chunk into RawItems.

Three input forms:
- a folder of images (jpg, jpeg, png, webp, bmp, gif, tif, tiff) with same-stem ``.txt`` or
  ``.json`` captions, walked recursively; a ``.json`` gives the caption (its "caption" or
  "text" field) only when there is no ``.txt``, and is kept as ``meta`` when it is an object;
  the ``.tar`` and ``.parquet`` files a folder holds are each read as if named on their own;
- a WebDataset ``.tar``: members ``KEY.ext`` grouped by KEY (the member path up to the first
  dot of its file name), with the same image and caption extensions;
- a ``.parquet`` file with an image-bytes column (``image``, ``image_bytes``, ``jpg`` or
  ``png``; binary, or a struct with ``bytes`` as HF datasets write) and a caption column
  (``caption`` or ``text``).
Files with other extensions are not samples and are skipped.

Every input item yields exactly one RawItem. Hostile input never crashes a run and is never
followed outside what was given: symlinks are reported (reason "symlink"), never read through;
tar members are read in memory, never extracted; a truncated tar ends with one
"truncated_tar" item holding the bytes after the last complete item. Reasons found here go in
``RawItem.problems``, and :func:`lens_model.data.prepare.prepare_shard` quarantines them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tarfile
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lens_model.data.items import RawItem

INPUT_IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
CAPTION_EXTS = frozenset({"txt", "json"})
SAMPLE_EXTS = INPUT_IMAGE_EXTS | CAPTION_EXTS
CONTAINER_EXTS = frozenset({"tar", "parquet"})  # in a folder: planned as their own inputs
PARQUET_IMAGE_COLUMNS = ("image", "image_bytes", "jpg", "png")
PARQUET_CAPTION_COLUMNS = ("caption", "text")
MAX_FILE_BYTES = 256 << 20  # one sample file bigger than this is refused, not loaded into memory
ACCEPTED = ("a folder of images with same-stem .txt/.json captions (and/or .tar and .parquet "
            "files), a WebDataset .tar "
            "(KEY.jpg/png/webp + KEY.txt/json), or a .parquet file with an image-bytes column "
            f"({', '.join(PARQUET_IMAGE_COLUMNS)}) and a caption column "
            f"({', '.join(PARQUET_CAPTION_COLUMNS)})")
# Reasons that mean the item's files could not be read as given, so "missing_*" would mislead.
_UNREAD = frozenset({"symlink", "special_file", "unreadable", "file_too_large", "unsafe_tar_path"})
_SAFE_PREFIX = re.compile(r"[A-Za-z0-9_-]*")

Problem = tuple[str, str]


def item_key(key_prefix: str, identity: str) -> str:
    """A stable, tar-safe key: the prefix plus 20 hex of the sha1 of the source identity."""
    digest = hashlib.sha1(identity.encode("utf-8", "surrogateescape")).hexdigest()
    return key_prefix + digest[:20]  # 80 bits: collisions stay negligible at 1e9 items


def _display(text: str) -> str:
    """``text`` made valid UTF-8 (file names may hold undecodable bytes)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _ext(name: str) -> str:
    base, dot, ext = name.rpartition(".")
    return ext.lower() if dot and base else ""


# ---------------------------------------------------------------- planning


def plan_chunks(paths: list[str | Path], samples_per_shard: int) -> list[dict[str, Any]]:
    """JSON-able chunk references of at most ``samples_per_shard`` items, in a stable order."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    chunks: list[dict[str, Any]] = []
    seen: set[str] = set()
    for given in paths:
        path = os.path.abspath(given)
        if path in seen:
            raise ValueError(f"ingest path {given} is given twice; name each input once")
        seen.add(path)
        if os.path.isdir(path):
            planned = _plan_folder(path, samples_per_shard)
        elif os.path.isfile(path) and path.lower().endswith(".tar"):
            planned = _plan_tar(path, samples_per_shard)
        elif os.path.isfile(path) and path.lower().endswith(".parquet"):
            planned = _plan_parquet(path, samples_per_shard)
        else:
            what = "does not exist" if not os.path.lexists(path) else "is of an unknown kind"
            raise ValueError(f"ingest path {given} {what}; accepted: {ACCEPTED}")
        if not planned:
            raise ValueError(f"ingest path {given} holds no samples; accepted: {ACCEPTED}")
        chunks += planned
    return chunks


def _walk(root: str) -> tuple[list[str], list[str]]:
    """Sorted relative paths of (sample files, symlinks and special files) and of the regular
    .tar and .parquet files; links not followed."""
    found, containers, stack = [], [], [""]
    while stack:
        rel = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(root, rel)))
        except OSError as exc:
            if not rel:
                raise ValueError(f"ingest folder {root} cannot be listed ({exc.strerror}); "
                                 "check its permissions") from None
            found.append(rel)  # an unlistable sub-folder becomes an item that says so
            continue
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir(follow_symlinks=False):
                stack.append(child)
            elif entry.is_file(follow_symlinks=False) and _ext(entry.name) in CONTAINER_EXTS:
                containers.append(child)
            elif (entry.is_symlink() or not entry.is_file(follow_symlinks=False)
                  or _ext(entry.name) in SAMPLE_EXTS):
                found.append(child)
    return sorted(found), sorted(containers)


def _plan_folder(root: str, per_chunk: int) -> list[dict[str, Any]]:
    groups: dict[str, list[str]] = {}
    files, containers = _walk(root)
    for rel in files:
        stem = rel[: -len(_ext(rel)) - 1] if _ext(rel) else rel
        groups.setdefault(stem, []).append(rel)
    items = [[stem, groups[stem]] for stem in sorted(groups)]
    chunks = [{"kind": "folder", "root": root, "items": items[i:i + per_chunk]}
              for i in range(0, len(items), per_chunk)]
    for rel in containers:
        plan = _plan_tar if _ext(rel) == "tar" else _plan_parquet
        chunks += plan(os.path.join(root, rel), per_chunk)
    return chunks


def _plan_tar(path: str, per_chunk: int) -> list[dict[str, Any]]:
    offsets = [group.offset for group in _tar_groups(path, 0, read=False)]
    return [{"kind": "tar", "path": path, "offset": offsets[i], "start": i,
             "count": len(offsets[i:i + per_chunk])} for i in range(0, len(offsets), per_chunk)]


def _plan_parquet(path: str, per_chunk: int) -> list[dict[str, Any]]:
    pf = _open_parquet(path)
    _parquet_columns(pf.schema_arrow, path)
    rows = pf.metadata.num_rows
    return [{"kind": "parquet", "path": path, "start": i, "stop": min(i + per_chunk, rows)}
            for i in range(0, rows, per_chunk)]


# ---------------------------------------------------------------- reading


def read_chunk(chunk: dict[str, Any], key_prefix: str) -> Iterator[RawItem]:
    """One RawItem per input item of ``chunk`` (from :func:`plan_chunks`)."""
    if not _SAFE_PREFIX.fullmatch(key_prefix):
        raise ValueError(f"key_prefix {key_prefix!r} may hold only letters, digits, '_' and '-'")
    readers = {"folder": _read_folder, "tar": _read_tar, "parquet": _read_parquet}
    kind = chunk.get("kind")
    if kind not in readers:
        raise ValueError(f"chunk kind {kind!r} is unknown; plan_chunks makes {sorted(readers)}")
    return readers[kind](chunk, key_prefix)


def _check_caption(raw: bytes, where: str) -> list[Problem]:
    problems = []
    if b"\0" in raw:
        problems.append(("caption_nul_bytes", f"{where}: the caption holds NUL bytes"))
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(("caption_not_utf8",
                         f"{where}: the caption is not UTF-8 (bad byte at {exc.start}); "
                         "re-save it as UTF-8"))
    return problems


def _caption(txt: bytes | None, js: bytes | None,
             where: str) -> tuple[bytes | None, dict | None, list[Problem]]:
    """``(caption bytes, meta, problems)`` from a ``.txt`` and/or ``.json`` member."""
    caption, meta, problems = txt, None, []
    if js is not None:
        try:
            obj = json.loads(js)
        except UnicodeDecodeError:
            obj, problems = None, [("caption_not_utf8", f"{where}.json is not UTF-8")]
        except (ValueError, RecursionError) as exc:
            obj, problems = None, [("bad_json", f"{where}.json is not valid JSON ({exc})")]
        meta = obj if isinstance(obj, dict) else None
        if caption is None:
            text = meta.get("caption", meta.get("text")) if meta is not None else None
            if problems:
                caption = js  # keep the original bytes for the quarantine
            elif isinstance(text, str):
                caption = text.encode("utf-8", "surrogatepass")  # lone surrogates fail below
            elif text is not None:
                problems.append(("bad_json", f"{where}.json: 'caption'/'text' is not a string"))
                caption = js
    if caption is not None and not problems:
        problems = _check_caption(caption, where)
    return caption, meta, problems


def _make_item(key: str, source: str, where: str, images: list[tuple[str, bytes | None]],
               txt: bytes | None, js: bytes | None, problems: list[Problem]) -> RawItem:
    """The RawItem of one grouped folder stem or tar key."""
    problems, where = list(problems), _display(where)
    if len(images) > 1:
        names = ", ".join(_display(name) for name, _ in images)
        problems.append(("ambiguous_stem", f"{where}: several images ({names}); keep one"))
    caption, meta, caption_problems = _caption(txt, js, where)
    problems += caption_problems
    if not any(code in _UNREAD for code, _ in problems):
        if not images:
            problems.append(("missing_image", f"{where}: a caption without an image; add the "
                                              "image under the same stem or remove the caption"))
        if caption is None and not caption_problems:
            problems.append(("missing_caption", f"{where}: an image without a caption; add a "
                                                "same-stem .txt (or .json with 'caption')"))
    image = images[0][1] if images else None
    return RawItem(key, _display(source), image, caption, meta, problems)


def _read_file(path: str) -> tuple[bytes | None, Problem | None]:
    """A regular file's bytes, never through a symlink, or the reason it was not read."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return None, ("unreadable", f"{_display(path)}: {exc.strerror}")
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        return os.fsencode(target), ("symlink", _display(target))
    if stat.S_ISDIR(st.st_mode):
        return None, ("unreadable", f"{_display(path)}: a folder that could not be listed")
    if not stat.S_ISREG(st.st_mode):
        return None, ("special_file", f"{_display(path)}: not a regular file")
    if st.st_size > MAX_FILE_BYTES:
        return None, ("file_too_large", f"{_display(path)}: {st.st_size} bytes > {MAX_FILE_BYTES}")
    try:  # O_NOFOLLOW: a link swapped in since lstat is refused, not followed
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None, ("special_file", f"{_display(path)}: not a regular file")
            return fh.read(MAX_FILE_BYTES), None
    except OSError as exc:
        return None, ("unreadable", f"{_display(path)}: {exc.strerror}")


def _inside(root: str, rel: str) -> str:
    """``root/rel``, refusing chunk entries that would leave ``root``."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise ValueError(f"folder chunk entry {rel!r} leaves its root {root}; re-plan the chunk")
    path = os.path.join(root, *parts)
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(os.path.dirname(path))]) != real_root:
        raise ValueError(f"{path} is reached through a symlinked folder; it is not read")
    return path


def _read_folder(chunk: dict[str, Any], key_prefix: str) -> Iterator[RawItem]:
    root = chunk["root"]
    for stem, rels in chunk["items"]:
        images: list[tuple[str, bytes | None]] = []
        txt = js = None
        problems: list[Problem] = []
        for rel in rels:
            path = _inside(root, rel)
            data, problem = _read_file(path)
            if problem:
                problems.append(problem)
            ext = _ext(rel)
            if ext == "txt":
                txt = data
            elif ext == "json":
                js = data
            else:
                images.append((rel, data))
        source = os.path.join(root, images[0][0] if images else rels[0])
        yield _make_item(item_key(key_prefix, f"{root}::{stem}"), source,
                         os.path.join(root, stem), images, txt, js, problems)


@dataclass
class _TarGroup:
    """The members of one WebDataset key, or (``broken``) the tail of a truncated tar."""

    name: str
    offset: int  # header offset of the group's first member
    images: list[tuple[str, bytes | None]] = field(default_factory=list)
    txt: bytes | None = None
    js: bytes | None = None
    problems: list[Problem] = field(default_factory=list)
    exts: list[str] = field(default_factory=list)
    keep: bool = False  # does the group hold anything that makes it an item?
    broken: str = ""


def _wds_split(name: str) -> tuple[str, str]:
    """``("dir/KEY", "ext")`` for member ``dir/KEY.ext`` (the key ends at the first dot)."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _add_member(group: _TarGroup, tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str,
                read: bool) -> None:
    name = _display(member.name)
    path = PurePosixPath(member.name)
    flagged = path.is_absolute() or ".." in path.parts  # such a member is an item of its own
    if flagged:
        group.problems.append(("unsafe_tar_path", name))
    data: bytes | None = None
    if member.issym() or member.islnk():
        group.problems.append(("symlink", _display(member.linkname)))
        flagged, data = True, member.linkname.encode("utf-8", "surrogateescape")
    elif member.isdir():
        group.keep = group.keep or flagged
        return
    elif not member.isreg():
        group.problems.append(("special_file", f"{name}: not a regular file"))
        flagged = True
    elif ext not in SAMPLE_EXTS and not flagged:
        return  # not a sample file (e.g. KEY.cls): skipped
    elif member.size > MAX_FILE_BYTES:
        group.problems.append(("file_too_large", f"{name}: {member.size} bytes"))
    elif read:
        fh = tar.extractfile(member)
        data = fh.read() if fh else b""
    group.keep = True
    if ext in ("txt", "json") and ext in group.exts:
        group.problems.append(("ambiguous_stem", f"{name}: a second .{ext} for one key"))
    group.exts.append(ext)
    if ext == "txt":
        group.txt = data
    elif ext == "json":
        group.js = data
    else:
        group.images.append((member.name, data))


def _tar_groups(path: str, offset: int, read: bool) -> Iterator[_TarGroup]:
    """Items of a WebDataset tar from the header at ``offset``; a break ends with a broken one."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        group: _TarGroup | None = None
        try:
            tar = tarfile.open(fileobj=fh, mode="r:")
            while (member := tar.next()) is not None:
                tar.members.clear()  # only streaming: don't keep every TarInfo of a big tar
                name, ext = _wds_split(member.name)
                if group is not None and name != group.name:
                    if group.keep:
                        yield group
                    group = None
                if group is None:
                    group = _TarGroup(name, member.offset)
                _add_member(group, tar, member, ext, read)
            end = tar.offset
            fh.seek(end)
            block = fh.read(tarfile.BLOCKSIZE)
            if len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0"):
                if group is not None and group.keep:
                    yield group
                return
            error = f"no end-of-archive block at byte {end}"
        except (tarfile.TarError, OSError, EOFError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            end = fh.tell()
        # The group in progress may be incomplete, so it goes with the tail.
        start = group.offset if group is not None else end
        left = max(0, os.fstat(fh.fileno()).st_size - start)
        tail = None
        if read:
            fh.seek(start)
            tail = fh.read(min(left, MAX_FILE_BYTES))
        detail = (f"{_display(path)} breaks near byte {end} ({error}); the item holds the "
                  f"{left} bytes from byte {start} on (at most {MAX_FILE_BYTES})")
        yield _TarGroup("", start, images=[("", tail)], broken=detail)


def _read_tar(chunk: dict[str, Any], key_prefix: str) -> Iterator[RawItem]:
    path = chunk["path"]
    with closing(_tar_groups(path, chunk["offset"], read=True)) as groups:
        for index, group in enumerate(islice(groups, chunk["count"]), start=chunk["start"]):
            yield _tar_item(path, index, group, key_prefix)


def _tar_item(path: str, index: int, group: _TarGroup, key_prefix: str) -> RawItem:
    if group.broken:
        where = f"{path}::@{group.offset}"
        return RawItem(item_key(key_prefix, where), _display(where), group.images[0][1], None,
                       None, [("truncated_tar", group.broken)])
    where = f"{path}::{group.name}"
    return _make_item(item_key(key_prefix, f"{where}::{index}"), where, where, group.images,
                      group.txt, group.js, group.problems)


def _open_parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"ingest path {path} is not a readable Parquet file ({exc}); "
                         f"accepted: {ACCEPTED}") from None


def _parquet_columns(schema: pa.Schema, path: str) -> tuple[str, str]:
    """The (image, caption) column names, or a ValueError naming what is accepted."""
    image = next((c for c in PARQUET_IMAGE_COLUMNS if c in schema.names), None)
    caption = next((c for c in PARQUET_CAPTION_COLUMNS if c in schema.names), None)
    binary = (pa.types.is_binary, pa.types.is_large_binary)
    text = (*binary, pa.types.is_string, pa.types.is_large_string)
    ok_image = image is not None and (
        any(f(schema.field(image).type) for f in binary)
        or (pa.types.is_struct(t := schema.field(image).type) and t.get_field_index("bytes") >= 0
            and any(f(t.field("bytes").type) for f in binary)))
    ok_caption = caption is not None and any(f(schema.field(caption).type) for f in text)
    if not (ok_image and ok_caption):
        raise ValueError(
            f"{path}: a Parquet input needs an image column named one of "
            f"{', '.join(PARQUET_IMAGE_COLUMNS)} (binary, or a struct with 'bytes') and a "
            f"caption column named one of {', '.join(PARQUET_CAPTION_COLUMNS)} (string); "
            f"it has {', '.join(f'{f.name}: {f.type}' for f in schema)}")
    return image, caption


def _read_parquet(chunk: dict[str, Any], key_prefix: str) -> Iterator[RawItem]:
    path, start, stop = chunk["path"], chunk["start"], chunk["stop"]
    pf = _open_parquet(path)
    image_col, caption_col = _parquet_columns(pf.schema_arrow, path)
    groups, first, base = [], 0, 0
    for i in range(pf.num_row_groups):  # read only the row groups that hold the range
        rows = pf.metadata.row_group(i).num_rows
        if first < stop and first + rows > start:
            base = first if not groups else base
            groups.append(i)
        first += rows
    if not groups:
        return
    table = pf.read_row_groups(groups, columns=[image_col, caption_col])
    table = table.slice(start - base, stop - start)
    images = table.column(image_col).to_pylist()
    caption_type = pa.large_binary() if pa.types.is_large_string(
        table.schema.field(caption_col).type) else pa.binary()
    captions = table.column(caption_col).cast(caption_type).to_pylist()  # no UTF-8 check here
    for row, (image, caption) in enumerate(zip(images, captions, strict=True), start=start):
        where = _display(f"{path}#{row}")
        problems: list[Problem] = []
        if isinstance(image, dict):
            if image.get("bytes") is None and image.get("path"):
                problems.append(("missing_image",
                                 f"{where}: the image is only a path ({image['path']}); files "
                                 "named by a row are not read: embed the image bytes"))
            image = image.get("bytes")
        if image is None and not problems:
            problems.append(("missing_image", f"{where}: the image cell is null"))
        if caption is None:
            problems.append(("missing_caption", f"{where}: the caption cell is null"))
        else:
            problems += _check_caption(caption, where)
        yield RawItem(item_key(key_prefix, where), where, image, caption, None, problems)
