"""Data-plane benchmarks (CPU). Measurements, not tests: results go to bench/results/*.json.

    python -m bench.data_bench [--rows 1000000] [--out bench/results/data_bench.json]

1. contract validation of a synthetic 1,000,000-row manifest through GX 1.x (target <= 3 s,
   GX's own overhead included), beside hand-vectorised pandas checks of the same rules;
2. per-shard validation mapped as Prefect tasks on a Dask cluster of 1 and 2 workers (rows/s);
3. packing efficiency over a realistic mix of the paper's 27 buckets (padding <= 2%),
   beside padding every batch to its largest member;
4. loader throughput (images/s) from shards with 2 workers;
5. shapes-world rendering on one core at 64x64 (target >= 300 images/s).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lens_model import atomic, defaults
from lens_model.buckets import buckets_for
from lens_model.data import contract as rules_mod
from lens_model.recipe import load_recipe


def synthetic_manifest(rows: int, seed: int = 0, clean: bool = False) -> pd.DataFrame:
    """Candidate rows shaped like a Lens-800M manifest; ~1% break some rule unless ``clean``."""
    rng = np.random.default_rng(seed)
    buckets = buckets_for(load_recipe("lens-3.8b").buckets)
    pick = rng.integers(0, len(buckets), rows)
    width = np.array([b.width for b in buckets])[pick]
    height = np.array([b.height for b in buckets])[pick]
    words = rng.normal(109, 25, rows).clip(5, 600).astype(np.int32)
    vocab = np.array("a red small large circle square triangle left right above below of the "
                     "on in with and background scene frame centre corner sits near".split())
    pool = [" ".join(rng.choice(vocab, n)) for n in rng.normal(109, 25, 997).clip(5, 600)
            .astype(int)]  # realistic lengths, so GX hashes as much text as a real manifest
    caption = np.array(pool, dtype=object)[rng.integers(0, len(pool), rows)]
    caption[rng.random(rows) < 0.002] = None
    df = pd.DataFrame({
        "key": [f"k{i:09d}" for i in range(rows)],
        "shard": "shard-000000.tar", "caption": caption, "word_count": words,
        "token_count": (words * 1.3).astype(np.int32), "width": width, "height": height,
        "area": (width * height).astype(np.int64), "aspect": (width / height).astype(np.float32),
        "bucket": np.array([b.name for b in buckets])[pick],
        "sha256": [f"{i:064x}" for i in rng.permutation(rows)],
        "source": "bench", "decodable": rng.random(rows) > 0.001,
        "blur": rng.gamma(4, 60, rows).astype(np.float32),
        "entropy": rng.normal(7, 0.6, rows).astype(np.float32),
        "luminance": rng.beta(5, 5, rows).astype(np.float32), "meta": None,
        "decode_error": None,
    })
    if clean:  # every row passes: nothing to read back from shards into quarantine
        c = load_recipe("lens-3.8b").data.contract
        df = df.assign(caption=df["caption"].fillna("a caption"), decodable=True,
                       word_count=df["word_count"].clip(c.caption_words_min, c.caption_words_max),
                       blur=df["blur"].clip(c.blur_min), entropy=df["entropy"].clip(c.entropy_min),
                       luminance=df["luminance"].clip(c.luminance_min, c.luminance_max))
    return df


def bench_contract(rows: int) -> dict[str, Any]:
    from tasks import gx_contract

    c = load_recipe("lens-3.8b").data.contract
    rules = rules_mod.rules(c)
    df = synthetic_manifest(rows)
    gx_contract.validate(df.head(1000), rules)  # build the context and suite once
    t0 = time.perf_counter()
    result = gx_contract.validate(df, rules)
    gx_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ok, _ = rules_mod.row_reasons(df, c)
    words, tokens = df["word_count"].to_numpy()[ok], df["token_count"].to_numpy()[ok]
    rules_mod.merge_verdict(rows, int((~ok).sum()), int(ok.sum()), int(words.sum()),
                            int((tokens > c.max_tokens).sum()), c)
    pandas_s = time.perf_counter() - t0
    return {"rows": rows, "expectations": len(rules), "gx_seconds": round(gx_s, 3),
            "pandas_seconds": round(pandas_s, 3), "gx_target_seconds": 3.0,
            "gx_within_target": gx_s <= 3.0, "rows_rejected": int((~ok).sum()),
            "gx_success": result["success"]}


def bench_mapped_validation(shards: int, rows_per_shard: int, work: Path) -> dict[str, Any]:
    """Per-shard validation mapped as Prefect tasks on a Dask cluster of 1, then 2, workers."""
    import pyarrow as pa
    from prefect import flow, unmapped

    from flows.data import shared_api
    from lens_model.data import shards as shard_io
    from tasks import data_flow_tasks as t

    recipe = load_recipe("lens-3.8b")
    prepared = []
    for i in range(shards):
        path = work / "candidates" / f"shard-{i:06d}.parquet"
        df = synthetic_manifest(rows_per_shard, seed=i, clean=True)
        df["sha256"] = [f"{i:08x}{j:056x}" for j in range(rows_per_shard)]
        shard_io.write_arrow(path, pa.Table.from_pandas(df, shard_io.CANDIDATE_SCHEMA,
                                                        preserve_index=False))
        prepared.append({"index": i, "inputs": rows_per_shard, "candidates": str(path),
                         "shard": str(work / shard_io.shard_name(i))})

    @flow(name="bench-mapped-validation")
    def mapped(out: str) -> float:
        t0 = time.perf_counter()
        futures = t.validate.with_options(refresh_cache=True).map(
            unmapped(recipe), prepared, unmapped(out))
        futures.result()
        return time.perf_counter() - t0

    out: dict[str, Any] = {"shards": shards, "rows": shards * rows_per_shard}
    with shared_api(recipe.data):  # lens-3.8b maps with Dask: workers report to one server
        out |= _map_over_workers(mapped, shards * rows_per_shard, work)
    return out


def _map_over_workers(mapped: Any, rows: int, work: Path) -> dict[str, Any]:
    from prefect_dask import DaskTaskRunner

    out = {}
    for workers in (1, 2):
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                                "processes": True, "dashboard_address": None})
        mapped.with_options(task_runner=runner)(str(work / f"out{workers}-warm"))  # imports
        seconds = mapped.with_options(task_runner=runner)(str(work / f"out{workers}"))
        out[f"workers_{workers}"] = {"seconds": round(seconds, 3),
                                     "rows_per_s": round(rows / seconds)}
    return out


def bench_packing() -> dict[str, Any]:
    from lens_model.packing import PHOTO_ASPECT_WEIGHTS, mixed_bucket_tokens, packing_report

    recipe = load_recipe("lens-3.8b")
    buckets = buckets_for(recipe.buckets)
    out = {}
    for mix, weights in (("uniform", None), ("photo_aspects", PHOTO_ASPECT_WEIGHTS)):
        reports = [packing_report(mixed_bucket_tokens(buckets, recipe.buckets.token_px,
                                                      recipe.loader.shuffle_buffer, seed, weights),
                                  recipe.loader.token_budget) for seed in range(5)]
        out[mix] = {"pool": recipe.loader.shuffle_buffer, "budget": recipe.loader.token_budget,
                    "packed_padding_max": max(r["packed_padding"] for r in reports),
                    "packed_padding_mean": float(np.mean([r["packed_padding"] for r in reports])),
                    "pad_to_max_padding_mean":
                        float(np.mean([r["pad_to_max_padding"] for r in reports])),
                    "pad_to_max_batch_size": reports[0]["pad_to_max_batch_size"],
                    "target_max_padding": 0.02}
    return out


def bench_render(n: int = 3000) -> dict[str, Any]:
    """Shapes-world items (scene, render, PNG, caption) on one pinned core at 64x64."""
    from lens_model.buckets import Bucket
    from lens_model.data import shapes, world

    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        rng = __import__("random").Random(0)
        scenes = [world.sample_scene(rng) for _ in range(n)]
        t0 = time.perf_counter()
        for scene in scenes:
            world.render(scene, 64, 64)
        render_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sum(1 for _ in shapes.make_items(0, 0, n, [Bucket(64, 64, 64)], 1, 4))
        items_s = time.perf_counter() - t0
    finally:
        os.sched_setaffinity(0, before)
    return {"size": "64x64", "cores": 1, "render_images_per_s": round(n / render_s),
            "full_items_per_s": round(n / items_s), "target_images_per_s": 300}


def bench_loader(work: Path, samples: int = 4096) -> dict[str, Any]:
    """Build a tiny shapes dataset, then read packed batches from its shards with 2 workers."""
    from lens_model.data.loader import loader_throughput
    from tasks import dataset

    recipe = load_recipe("tiny", [f"data.num_samples={samples}", "data.samples_per_shard=512"])
    t0 = time.perf_counter()
    dataset.prepare_all(recipe, work / "raw")
    merged = dataset.validate_all(recipe, work / "raw", work / "dataset")
    build_s = time.perf_counter() - t0
    result = loader_throughput(work / "dataset", buckets_for(recipe.buckets),
                               recipe.buckets.token_px, recipe.loader.token_budget,
                               num_workers=2, batches=200)
    return {"dataset_build": {"samples": samples, "valid": merged["valid"],
                              "seconds": round(build_s, 2),
                              "samples_per_s": round(samples / build_s)}, "loader": result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--out", default="bench/results/data_bench.json")
    args = ap.parse_args()
    defaults.apply()  # before the benches import Prefect, GX and Dask: they read it on import
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory(prefix="lens-bench-") as tmp:
        work = Path(tmp)
        results["render"] = bench_render()
        results["packing"] = bench_packing()
        results["contract_1m"] = bench_contract(args.rows)
        results["mapped_validation"] = bench_mapped_validation(8, args.rows // 8, work / "map")
        results["loader"] = bench_loader(work / "loader")
    print(json.dumps(results, indent=2))
    atomic.write_text(args.out, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
