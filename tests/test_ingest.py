"""Ingest end to end on hostile and normal inputs: plan_chunks -> read_chunk -> prepare_shard."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lens_model.buckets import make_buckets
from lens_model.data import shards
from lens_model.data.ingest import plan_chunks, read_chunk
from lens_model.data.items import RawItem
from lens_model.data.prepare import prepare_shard
from lens_model.data.tokens import count_tokens, load_tokenizer
from lens_model.recipe import ASPECT_RATIOS_1_2_TO_2_1
from tests import hostile
from tests.hostile import Expect

BUCKETS = make_buckets([32, 48, 64], ASPECT_RATIOS_1_2_TO_2_1, 8)
KEY_RE = re.compile(r"t[0-9a-f]{20}")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("minilm")[0]


def run(inputs: list[Path], out: Path, tok, per_shard: int = 8):
    """Plan, read and prepare ``inputs`` into ``out``; every bomb warning is an error here."""
    chunks = plan_chunks(inputs, per_shard)
    assert json.loads(json.dumps(chunks)) == chunks  # chunk references are JSON-able
    assert plan_chunks(inputs, per_shard) == chunks  # and deterministic
    candidates, quarantine, n_items = [], [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for i, chunk in enumerate(chunks):
            items = list(read_chunk(chunk, "t"))
            assert len(items) <= per_shard
            n_items += len(items)
            c, q = prepare_shard(items, out / shards.shard_name(i), BUCKETS, tok)
            candidates += c
            quarantine += q
    assert n_items == len(candidates) + len(quarantine)
    keys = [r["key"] for r in candidates + quarantine]
    assert len(set(keys)) == len(keys) and all(KEY_RE.fullmatch(k) for k in keys)
    # Rows fit their schemas (the contract reads these tables).
    shards.write_table(out / "candidates.parquet", candidates, shards.CANDIDATE_SCHEMA)
    shards.write_table(out / "quarantine.parquet", quarantine, shards.QUARANTINE_SCHEMA)
    members = {}
    for shard in sorted(out.glob("shard-*.tar")):
        members.update(dict(shards.iter_shard(shard)))
    return candidates, quarantine, members


def check(name: str, exp: Expect, rows: dict[str, dict], members: dict[str, dict],
          original: bytes | None = None) -> None:
    """Assert that case ``name`` came out as ``exp`` says."""
    row = rows[name]
    if exp.reason:
        assert exp.reason in row["reasons"], (name, row["reasons"], row["detail"])
        assert row["stage"] == "ingest" and row["detail"]
        assert row["key"] not in members, f"{name}: quarantined, yet written into the shard"
        return
    assert "reasons" not in row, (name, row.get("reasons"), row.get("detail"))
    parts = members[row["key"]]
    info = json.loads(parts["json"])
    assert info["source"] == row["source"]
    if exp.decode_error:
        assert (row["decode_error"], row["decodable"]) == (exp.decode_error, False), name
        assert (row["width"], row["height"], row["area"], row["bucket"]) == (None,) * 4
        assert row["blur"] is row["entropy"] is row["luminance"] is None
        assert parts["bin"] == original and info["mode"] is None
        return
    assert row["decodable"] and row["decode_error"] is None, (name, row["decode_error"])
    assert info["mode"] == exp.mode, name
    ext = next(e for e in shards.IMAGE_EXTS if e in parts)
    if exp.ext:
        assert ext == exp.ext, name
    if exp.same_bytes:
        assert parts[ext] == original, name
    img = Image.open(io.BytesIO(parts[ext]))
    assert img.mode == "RGB" and img.size == (row["width"], row["height"]), name
    for xy, rgb in exp.pixels.items():
        assert all(abs(a - b) <= 3 for a, b in zip(img.getpixel(xy), rgb, strict=True)), \
            (name, xy, img.getpixel(xy), rgb)
    assert row["area"] == row["width"] * row["height"] and row["bucket"]
    assert row["sha256"] and all(row[f] is not None for f in ("blur", "entropy", "luminance"))


def test_hostile_folder(tmp_path, tok):
    inp, outside, out = tmp_path / "in", tmp_path / "outside", tmp_path / "out"
    cases = hostile.build_folder(inp, outside)
    originals = {p.relative_to(inp).with_suffix("").as_posix(): p.read_bytes()
                 for p in inp.rglob("*") if p.suffix not in (".txt", ".json", ".md")
                 and p.is_file() and not p.is_symlink()}
    before, cwd_before = hostile.snapshot(tmp_path), sorted(os.listdir())
    candidates, quarantine, members = run([inp], out, tok)

    # Nothing was written outside the output folder, and the output holds only our files.
    assert hostile.snapshot(tmp_path, skip=out) == before
    assert sorted(os.listdir()) == cwd_before
    assert {p.name for p in out.iterdir()} <= {shards.shard_name(i) for i in range(99)} | {
        "candidates.parquet", "quarantine.parquet"}

    # Exactly one row per case.
    rows = {Path(r["source"]).relative_to(inp).with_suffix("").as_posix(): r
            for r in candidates + quarantine}
    assert len(rows) == len(candidates) + len(quarantine)
    assert set(rows) == set(cases)
    for name, exp in cases.items():
        check(name, exp, rows, members, originals.get(name))

    # Symlinks: the target is named, its path is the image bytes, nothing was read through it.
    for name, target in [("link_out", outside / "secret.png"), ("link_dir", outside / "dir"),
                         ("link_broken", inp / "nowhere.png")]:
        assert rows[name]["reasons"] == ["symlink"]
        assert rows[name]["detail"] == str(target)
        assert rows[name]["image_bytes"] == os.fsencode(target)
    assert rows["link_caption"]["caption_bytes"] == os.fsencode(outside / "secret.txt")
    everything = b"".join(b for row in quarantine for b in (row["image_bytes"] or b"",
                                                             row["caption_bytes"] or b""))
    everything += b"".join(p.read_bytes() for p in out.iterdir())
    assert hostile.SECRET[:20] not in everything

    # Shapes and captions pass through for the contract to judge.
    assert (rows["tiny"]["area"], rows["tiny"]["aspect"]) == (1, 1.0)
    assert rows["wide"]["aspect"] == pytest.approx(100.0)
    assert rows["tall"]["aspect"] == pytest.approx(0.01)
    assert rows["caption_empty"]["caption"] is rows["caption_space"]["caption"] is None
    assert members[rows["caption_space"]["key"]]["txt"] == b" \t\n  \r\n"  # kept as given
    big = rows["caption_10k"]
    assert big["word_count"] == 10_000 and big["token_count"] >= 10_002  # nothing truncated
    assert rows["dup_a"]["sha256"] == rows["dup_b"]["sha256"]
    assert rows["ok_json"]["caption"] == hostile.CAPTION.decode()
    assert json.loads(rows["ok_json"]["meta"])["url"] == "u"
    assert rows["ok_png"]["word_count"] == len(hostile.CAPTION.split())
    assert rows["ok_png"]["token_count"] == len(hostile.CAPTION.split()) + 2  # [CLS] .. [SEP]


def test_tars(tmp_path, tok):
    cases = hostile.build_tars(tmp_path / "tars")
    inputs = [tmp_path / "tars" / name for name in cases]
    before = hostile.snapshot(tmp_path)
    out = tmp_path / "out"
    candidates, quarantine, members = run(inputs, out, tok, per_shard=2)
    assert hostile.snapshot(tmp_path, skip=out) == before  # nothing extracted anywhere
    assert not (tmp_path / "tars" / "escaped").exists() and not (tmp_path / "escape.png").exists()

    rows: dict[str, dict[str, dict]] = {}
    for row in candidates + quarantine:
        tar, _, name = row["source"].partition("::")
        rows.setdefault(Path(tar).name, {})["@tail" if name.startswith("@") else name] = row
    originals = {f"s{i:04d}": hostile.encode(hostile.noise(seed=i)) for i in range(3)}
    for tar, expected in cases.items():
        assert set(rows[tar]) == set(expected), tar
        for name, exp in expected.items():
            check(name, exp, rows[tar], members, originals.get(name))

    normal = rows["normal.tar"]["s0001"]
    assert normal["caption"] == hostile.CAPTION.decode() + " number 1"
    assert json.loads(normal["meta"]) == {"i": 1}  # KEY.json is meta; KEY.cls is skipped
    assert rows["unsafe.tar"]["lnk"]["detail"] == "/etc/passwd"
    assert rows["unsafe.tar"]["lnk"]["image_bytes"] == b"/etc/passwd"
    for tar in ("cut_data.tar", "cut_header.tar"):
        tail = rows[tar]["@tail"]
        assert tar in tail["detail"] and "byte" in tail["detail"]
        data = (tmp_path / "tars" / tar).read_bytes()
        assert tail["image_bytes"] and data.endswith(tail["image_bytes"])

    # Keys are stable across runs.
    again = [item.key for c in plan_chunks(inputs, 2) for item in read_chunk(c, "t")]
    assert sorted(again) == sorted(r["key"] for r in candidates + quarantine)


def test_parquet(tmp_path, tok):
    cases = hostile.build_parquet(tmp_path / "pq")
    candidates, quarantine, members = run([tmp_path / "pq" / n for n in cases],
                                          tmp_path / "out", tok, per_shard=3)
    rows: dict[str, dict[str, dict]] = {}
    for row in candidates + quarantine:
        path, _, index = row["source"].rpartition("#")
        rows.setdefault(Path(path).name, {})[index] = row
    for name, expected in cases.items():
        assert set(rows[name]) == {str(i) for i in expected}
        for i, exp in expected.items():
            original = hostile.encode(hostile.noise(seed=9), "JPEG") if name == "plain.parquet" \
                else None
            check(str(i), exp, rows[name], members, original)
    assert rows["hf.parquet"]["0"]["caption"] == hostile.CAPTION.decode()
    assert "/somewhere/else.png" in rows["hf.parquet"]["2"]["detail"]


def test_folder_roundtrip_and_chunking(tmp_path, tok):
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(7):
        (inp / f"img{i}.png").write_bytes(hostile.encode(hostile.noise(seed=i)))
        (inp / f"img{i}.txt").write_bytes(hostile.CAPTION)
    chunks = plan_chunks([str(inp)], 3)
    assert [len(c["items"]) for c in chunks] == [3, 3, 1]
    candidates, quarantine, members = run([inp], tmp_path / "out", tok, per_shard=3)
    assert len(candidates) == 7 and not quarantine
    assert sorted(Path(r["source"]).name for r in candidates) == [f"img{i}.png" for i in range(7)]
    for row in candidates:
        parts = members[row["key"]]
        assert set(parts) == {"png", "txt", "json"} and parts["txt"] == hostile.CAPTION
        assert row["shard"].startswith("shard-") and row["bucket"] == "64x64"


def test_a_folder_of_tars_and_parquet_reads_each_as_if_named(tmp_path, tok):
    """A folder may hold WebDataset tars and Parquet files beside images: each is planned and
    read as if given on the command line, and every sample arrives."""
    inp = tmp_path / "in"
    (inp / "sub").mkdir(parents=True)
    image = hostile.encode(hostile.noise(seed=1))
    with tarfile.open(inp / "sub" / "part-0.tar", "w") as tar:
        for i in range(3):
            for ext, data in (("png", image), ("txt", hostile.CAPTION)):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"image": [image] * 2, "caption": ["a caption"] * 2}),
                   inp / "rows.parquet")
    (inp / "img.png").write_bytes(image)
    (inp / "img.txt").write_bytes(hostile.CAPTION)
    kinds = [c["kind"] for c in plan_chunks([inp], 2)]
    assert kinds == ["folder", "parquet", "tar", "tar"]  # files, then containers by path
    candidates, quarantine, _ = run([inp], tmp_path / "out", tok, per_shard=2)
    assert not quarantine and len(candidates) == 6
    sources = sorted(r["source"].replace(str(inp), "IN") for r in candidates)
    assert sources == ["IN/img.png", "IN/rows.parquet#0", "IN/rows.parquet#1",
                       *(f"IN/sub/part-0.tar::s{i}" for i in range(3))]


def test_plan_errors(tmp_path):
    with pytest.raises(ValueError, match="nope.*does not exist.*accepted: a folder"):
        plan_chunks([tmp_path / "nope"], 4)
    (tmp_path / "data.zip").write_bytes(b"PK")
    with pytest.raises(ValueError, match="data.zip is of an unknown kind.*parquet"):
        plan_chunks([tmp_path / "data.zip"], 4)
    pq.write_table(pa.table({"pixels": pa.array([b"x"]), "caption": pa.array(["c"])}),
                   tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet.*image column.*it has pixels"):
        plan_chunks([tmp_path / "bad.parquet"], 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no samples"):
        plan_chunks([tmp_path / "empty"], 4)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_bytes(b"caption")
    with pytest.raises(ValueError, match="given twice"):
        plan_chunks([tmp_path / "one", str(tmp_path / "one")], 4)
    with pytest.raises(ValueError, match="key_prefix"):
        read_chunk({"kind": "folder", "root": str(tmp_path), "items": []}, "a/b")
    with pytest.raises(ValueError, match="leaves its root"):
        list(read_chunk({"kind": "folder", "root": str(tmp_path / "empty"),
                         "items": [["x", ["../data.zip"]]]}, "t"))


def test_prepare_counts_and_bombs(tmp_path, tok):
    """Problems, duplicate keys and a small max_pixels all land in the right place."""
    png = hostile.encode(hostile.noise())
    items = [RawItem("a", "s", png, b"ok"), RawItem("a", "s", png, b"again"),
             RawItem("b", "s", png, None, problems=[("symlink", "/x"), ("missing_caption", "y")]),
             RawItem("c", "s", None, b"no image, no problem recorded")]
    candidates, quarantine = prepare_shard(items, tmp_path / "s.tar", BUCKETS, tok,
                                           max_pixels=64 * 64 - 1)
    assert [r["decode_error"] for r in candidates] == ["decompression_bomb", "missing_image"]
    assert [r["reasons"] for r in quarantine] == [["duplicate_key"], ["symlink", "missing_caption"]]
    assert quarantine[1]["detail"] == "/x; y"


def test_tokenizer(tmp_path):
    tok, note = load_tokenizer("minilm")
    assert note == "" and load_tokenizer("minilm")[0] is tok  # cached
    assert count_tokens(tok, ["hello world", "", "a b c"]) == [4, 2, 5]
    other, note = load_tokenizer(str(tmp_path / "no-such-tokenizer"))
    assert other is tok and "no-such-tokenizer" in note and "MiniLM" in note


@pytest.mark.slow
def test_prepare_throughput(tmp_path, tok):
    """64x64 images: well over 300 items/s on one core."""
    caption = b" ".join([b"word"] * 100)
    items = [RawItem(f"k{i}", "s", hostile.encode(hostile.noise(seed=i)), caption)
             for i in range(512)]
    start = time.perf_counter()
    prepare_shard(items, tmp_path / "s.tar", BUCKETS, tok)
    assert len(items) / (time.perf_counter() - start) > 300
