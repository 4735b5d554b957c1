"""PackedLoader: deterministic plans, rank slices, decoding, workers and exact resume."""

from __future__ import annotations

import io
import json
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lens_model.buckets import fit_to_bucket, make_buckets
from lens_model.data.loader import Batch, PackedLoader, loader_throughput
from lens_model.data.shards import MANIFEST, MANIFEST_SCHEMA, shard_name, write_shard, write_table
from lens_model.recipe import ASPECT_RATIOS_1_2_TO_2_1

BUCKETS = make_buckets([32, 48, 64], ASPECT_RATIOS_1_2_TO_2_1, 8)
TOKEN_PX, BUDGET, BUFFER = 8, 256, 25
ROWS, PER_SHARD = 60, 20


def _image(i: int, width: int, height: int) -> Image.Image:
    """A gradient unique to sample ``i``, so crops and mix-ups show in the pixels."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, np.full_like(x, (i * 37) % 256)], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def build_dataset(root: Path, rows: int = ROWS, buckets: list = BUCKETS) -> dict[str, Image.Image]:
    """Shards of gradient images a little larger than their buckets, plus orphans."""
    images: dict[str, Image.Image] = {}
    manifest = []
    for s in range(0, rows, PER_SHARD):
        samples = []
        for i in range(s, min(s + PER_SHARD, rows)):
            key, bucket = f"k{i:05d}", buckets[(i * 7) % len(buckets)]
            img = _image(i, bucket.width + 6, bucket.height + 4)
            fmt = "jpg" if i % 10 == 3 else "png"
            buf = io.BytesIO()
            img.save(buf, format="JPEG" if fmt == "jpg" else "PNG")
            images[key] = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
            caption = f"caption of sample {i}"
            samples.append((key, {fmt: buf.getvalue(), "txt": caption.encode(), "json": b"{}"}))
            manifest.append({"key": key, "shard": shard_name(s // PER_SHARD), "caption": caption,
                             "width": img.width, "height": img.height, "bucket": bucket.name})
        samples.append((f"orphan{s:05d}", {"png": samples[0][1].get("png", b""), "txt": b"x"}))
        write_shard(root / shard_name(s // PER_SHARD), sorted(samples))
    write_table(root / MANIFEST, manifest, MANIFEST_SCHEMA)
    return images


def make_loader(root: Path, **kw) -> PackedLoader:
    args = {"seed": 0, "num_workers": 0, "shuffle_buffer": BUFFER, **kw}
    return PackedLoader(root, BUCKETS, TOKEN_PX, BUDGET, **args)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Image.Image]]:
    root = tmp_path_factory.mktemp("packed")
    return root, build_dataset(root)


@pytest.fixture(scope="module")
def reference(dataset) -> list[Batch]:
    """An uninterrupted run of 2 epochs and 3 batches, in the main process."""
    loader = make_loader(dataset[0])
    n = loader.batches_in_epoch(0) + loader.batches_in_epoch(1) + 3
    return list(islice(loader, n))


def _same(a: list[Batch], b: list[Batch]) -> None:
    assert [(x.epoch, x.index, x.keys) for x in a] == [(x.epoch, x.index, x.keys) for x in b]
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(x.images, y.images, strict=True))


def test_plan_covers_epoch_and_ranks_are_disjoint(dataset) -> None:
    root = dataset[0]
    loader = make_loader(root)
    plan = loader.global_plan(0)
    assert sorted(r for b in plan for r in b) == list(range(ROWS))
    assert all(loader.tokens[b].sum() <= BUDGET for b in plan)
    assert loader.epoch_plan(0) == plan and loader.global_plan(0) == plan
    assert loader.global_plan(1) != plan  # reshuffled per epoch
    other = make_loader(root, seed=1).global_plan(0)  # other seed: other batch contents
    assert {frozenset(b) for b in other} != {frozenset(b) for b in plan}

    world = 3
    slices = [make_loader(root, rank=r, world_size=world).epoch_plan(0) for r in range(world)]
    kept = len(plan) - len(plan) % world
    assert {len(s) for s in slices} == {kept // world}
    rows = [r for s in slices for b in s for r in b]
    assert len(rows) == len(set(rows))  # disjoint
    assert sorted(rows) == sorted(r for b in plan[:kept] for r in b)  # the dropped tail apart
    with pytest.raises(ValueError, match="rank 3"):
        make_loader(root, rank=3, world_size=3)


def test_batches_decode_to_buckets(dataset, reference) -> None:
    root, images = dataset
    by_name = {b.name: b for b in BUCKETS}
    loader = make_loader(root)
    for batch in reference:
        assert batch.tokens <= BUDGET and batch.index < loader.batches_in_epoch(batch.epoch)
        for key, caption, img, grid, name in zip(batch.keys, batch.captions, batch.images,
                                                 batch.grids, batch.buckets, strict=True):
            assert key.startswith("k") and caption == f"caption of sample {int(key[1:])}"
            bucket = by_name[name]
            assert img.shape == (3, bucket.height, bucket.width) and img.dtype == torch.float32
            assert grid == (bucket.height // TOKEN_PX, bucket.width // TOKEN_PX)
            want = np.asarray(fit_to_bucket(images[key], bucket), dtype=np.float32)
            want_t = torch.from_numpy(want).permute(2, 0, 1) / 127.5 - 1
            torch.testing.assert_close(img, want_t, atol=1e-6, rtol=0)
    epochs = [[k for b in reference if b.epoch == e for k in b.keys] for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == [f"k{i:05d}" for i in range(ROWS)]
    assert epochs[0] != epochs[1]
    assert [b.index for b in reference if b.epoch == 0] == list(range(loader.batches_in_epoch(0)))


def test_workers_give_identical_batches(dataset, reference) -> None:
    _same(list(islice(make_loader(dataset[0], num_workers=2), len(reference))), reference)


def test_resume_mid_epoch_and_across_epochs(dataset, reference) -> None:
    root = dataset[0]
    first = make_loader(root).batches_in_epoch(0)
    for k, workers in [(3, 0), (first, 0), (first + 2, 0), (5, 1)]:
        loader = make_loader(root)
        _same(list(islice(loader, k)), reference[:k])
        state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
        resumed = make_loader(root, num_workers=workers)
        resumed.load_state_dict(state)
        _same(list(islice(resumed, len(reference) - k)), reference[k:])


def test_a_state_re_dealt_to_another_world_size_takes_no_batch_twice(dataset) -> None:
    """Two ranks took 2 batches each; the one rank that resumes goes on from the epoch's
    fifth batch, and three ranks from their second (global batches 3, 4, 5 on): nothing the
    old ranks took comes again."""
    root = dataset[0]
    old = [make_loader(root, rank=r, world_size=2) for r in (0, 1)]
    taken = {k for loader in old for b in islice(loader, 2) for k in b.keys}
    states = [json.loads(json.dumps(loader.state_dict())) for loader in old]
    one = make_loader(root)
    one.load_state_dict(one.reshard_state(states, 0, 1))
    assert (one.state_dict()["epoch"], one.state_dict()["index"]) == (0, 4)
    assert taken == {k for b in islice(make_loader(root), 4) for k in b.keys}
    assert taken.isdisjoint(
        k for b in islice(one, one.batches_in_epoch(0) - 4) for k in b.keys)
    three = [make_loader(root, rank=r, world_size=3) for r in range(3)]
    for r, loader in enumerate(three):
        loader.load_state_dict(loader.reshard_state(states, r, 3))
        assert taken.isdisjoint(next(iter(loader)).keys)
    with pytest.raises(ValueError, match="different places"):
        one.reshard_state([states[0], {**states[1], "index": 1}], 0, 1)


def test_state_from_other_settings_is_refused(dataset) -> None:
    state = make_loader(dataset[0]).state_dict()
    with pytest.raises(ValueError, match="seed=0 but this loader has 1"):
        make_loader(dataset[0], seed=1).load_state_dict(state)


def test_bad_manifest_rows_are_named(tmp_path: Path) -> None:
    build_dataset(tmp_path, rows=20)
    with pytest.raises(ValueError, match=r"sample 'k00\d+' in bucket \S+ has \d+ tokens.*"
                                         r"token_budget"):
        PackedLoader(tmp_path, BUCKETS, TOKEN_PX, 64, seed=0)
    with pytest.raises(ValueError, match="not among the loader's"):
        PackedLoader(tmp_path, BUCKETS[:3], TOKEN_PX, BUDGET, seed=0)
    with pytest.raises(FileNotFoundError, match="no manifest.parquet"):
        PackedLoader(tmp_path / "missing", BUCKETS, TOKEN_PX, BUDGET, seed=0)

    rows = pq.read_table(tmp_path / MANIFEST).to_pylist()
    write_table(tmp_path / MANIFEST, rows + [{**rows[0], "key": "ghost"}], MANIFEST_SCHEMA)
    with pytest.raises(ValueError, match="'ghost': shard shard-000000.tar has no image member"):
        list(islice(make_loader(tmp_path), 20))


def test_loader_throughput_reports(dataset) -> None:
    out = loader_throughput(dataset[0], BUCKETS, TOKEN_PX, BUDGET, num_workers=0, batches=4,
                            shuffle_buffer=BUFFER)
    assert out["batches"] == 4 and out["images"] > 4 and out["images_per_s"] > 0


def test_no_decode_gives_the_same_batches_without_images(dataset) -> None:
    root, _ = dataset
    a, b = next(iter(make_loader(root))), next(iter(make_loader(root, decode=False)))
    assert a.keys == b.keys and a.grids == b.grids and a.captions == b.captions
    assert b.images == [] and len(a.images) == len(a.keys)
