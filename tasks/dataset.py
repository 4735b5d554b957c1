"""Building a dataset: prepare shards -> validate each against the contract -> merge once.

These are plain functions over references (paths and small dicts), so the Prefect tasks in
``tasks/data_flow_tasks.py``, the DVC stages (``lens data prepare|validate``) and
``lens data ingest`` all run the same code. Layout of one build::

    RAW/shard-000000.tar                 samples as prepared (images, captions, json)
    RAW/candidates/shard-000000.parquet  one row per decodable-or-not item, with features
    RAW/rejects/shard-000000.parquet     items quarantined while reading (with bytes)
    RAW/refs/shard-000000.json           what prepare counted (so validate can run alone)
    OUT/parts/shard-000000.{valid,rejected}.parquet, .gx.json   per-shard contract results
    OUT/manifest.parquet                 valid rows; ``shard`` is relative to OUT
    OUT/quarantine.parquet               every rejected input, its reasons and its bytes
    OUT/contract.json, OUT/contract.md   the GX results, the merged checks and the verdict
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lens_model import atomic
from lens_model.buckets import buckets_for
from lens_model.data import contract as rules_mod
from lens_model.data import ingest, shapes, shards, tokens
from lens_model.data.items import RawItem
from lens_model.data.prepare import prepare_shard
from lens_model.recipe import Recipe
from tasks import gx_contract


class ContractFailed(RuntimeError):
    """The batch as a whole broke the contract; the report says why."""


# The code a dataset's bytes depend on (dvc.yaml's deps name the same files). The recipe
# schema is not among them: the resolved values it yields are (Recipe.data_hash, params).
BUILD_CODE = ("lens_model/data", "lens_model/buckets.py", "lens_model/atomic.py",
              "tasks/dataset.py", "tasks/gx_contract.py")


@functools.cache
def code_fingerprint(code: tuple[str, ...] = BUILD_CODE) -> str:
    """Hash of the files and folders ``code`` names (repo-relative), so outputs of older code
    are never taken for current ones."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for entry in code:
        path = root / entry
        for file in sorted(path.glob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(root).as_posix().encode() + file.read_bytes())
    return digest.hexdigest()[:12]


def stamp(recipe: Recipe) -> str:
    """What outputs on disk must have been built from: this data recipe and this code."""
    return f"{recipe.data_hash()}-{code_fingerprint()}"


def plan(recipe: Recipe) -> list[dict[str, Any]]:
    """JSON-able chunk references, one per shard to prepare."""
    d = recipe.data
    if d.source == "shapes":
        step = d.samples_per_shard
        return [{"kind": "shapes", "start": s, "stop": min(s + step, d.num_samples)}
                for s in range(0, d.num_samples, step)]
    return ingest.plan_chunks(list(d.ingest_paths), d.samples_per_shard)


def _items(recipe: Recipe, chunk: dict[str, Any], index: int) -> Iterator[RawItem]:
    if chunk["kind"] == "shapes":
        d = recipe.data
        return shapes.make_items(recipe.seed, chunk["start"], chunk["stop"],
                                 buckets_for(recipe.buckets), d.min_objects, d.max_objects,
                                 tuple(d.backgrounds), tuple(d.patterns))
    return ingest.read_chunk(chunk, key_prefix="in")  # keys hash the source: stable anyway


def _paths(raw: Path, index: int) -> dict[str, Path]:
    name = shards.shard_name(index)
    stem = name.removesuffix(".tar")
    return {"shard": raw / name, "candidates": raw / "candidates" / f"{stem}.parquet",
            "rejects": raw / "rejects" / f"{stem}.parquet", "ref": raw / "refs" / f"{stem}.json"}


def prune(raw: Path, out: Path, shards_planned: int) -> None:
    """Delete shard files left by an earlier, larger build, so outputs hold this build only."""
    for path in [*Path(raw).glob("**/shard-*"), *Path(out).glob("parts/shard-*")]:
        if int(path.name[6:12]) >= shards_planned:
            path.unlink()


def load_prepared(raw: Path) -> list[dict[str, Any]]:
    """The prepare results recorded under ``raw`` (the DVC validate stage starts from them)."""
    refs = [json.loads(p.read_text()) for p in sorted(Path(raw).glob("refs/shard-*.json"))]
    if not refs:
        raise FileNotFoundError(f"{raw} holds no prepared shards; run `lens data prepare` first")
    return [{**ref, **{k: str(v) for k, v in _paths(Path(raw), ref["index"]).items()}}
            for ref in refs]


def prepare_chunk(recipe: Recipe, chunk: dict[str, Any], index: int, raw: Path) -> dict[str, Any]:
    """Read one chunk, write its shard, candidate rows and read-time rejects."""
    paths = _paths(Path(raw), index)
    tokenizer, note = tokens.load_tokenizer(recipe.data.contract.tokenizer)
    candidates, rejects = prepare_shard(_items(recipe, chunk, index), paths["shard"],
                                        buckets_for(recipe.buckets), tokenizer)
    shards.write_table(paths["candidates"], candidates, shards.CANDIDATE_SCHEMA)
    shards.write_table(paths["rejects"], rejects, shards.QUARANTINE_SCHEMA)
    ref = {"index": index, "inputs": len(candidates) + len(rejects), "tokenizer_note": note,
           "stamp": stamp(recipe)}
    atomic.write_json(paths["ref"], ref)
    return {**ref, **{k: str(v) for k, v in paths.items()}}


def _member_bytes(shard: Path, keys: list[str]) -> dict[str, tuple[bytes | None, bytes | None]]:
    """Original (image, caption) bytes of ``keys``, read back from their shard."""
    index = shards.index_shard(shard)
    out: dict[str, tuple[bytes | None, bytes | None]] = {}
    with open(shard, "rb") as fh:
        for key in keys:
            members = index.get(key, {})
            ext = next((e for e in (shards.ORIGINAL_EXT, *shards.IMAGE_EXTS) if e in members),
                       None)
            image = shards.read_member(fh, *members[ext]) if ext else None
            caption = shards.read_member(fh, *members["txt"]) if "txt" in members else None
            out[key] = (image, caption)
    return out


def _detail(row: pd.Series, reasons: list[str], by_reason: dict[str, rules_mod.Rule]) -> str:
    parts = []
    for reason in reasons:
        rule = by_reason.get(reason)
        if rule is None:  # a decode error
            parts.append(f"{reason}: the image bytes did not decode")
        else:
            parts.append(f"{reason}: {rule.column}={row.get(rule.column)!r} breaks "
                         f"{rule.describe()}")
    return "; ".join(parts)


def _quarantine_rows(df: pd.DataFrame, reasons: list[list[str]], shard: Path, stage: str,
                     rules: list[rules_mod.Rule]) -> list[dict[str, Any]]:
    """Quarantine rows for ``df``'s rows (``reasons`` in the same order), bytes from the shard."""
    if df.empty:
        return []
    by_reason = {r.reason: r for r in rules}
    originals = _member_bytes(shard, list(df["key"]))
    return [{"key": row["key"], "source": row["source"], "reasons": why,
             "detail": _detail(row, why, by_reason), "stage": stage,
             "image_bytes": originals[row["key"]][0], "caption_bytes": originals[row["key"]][1]}
            for (_, row), why in zip(df.iterrows(), reasons, strict=True)]


def _part(out: Path, index: int, suffix: str) -> Path:
    return out / "parts" / shards.shard_name(index).replace(".tar", suffix)


def validate_shard(recipe: Recipe, prepared: dict[str, Any], out: Path) -> dict[str, Any]:
    """Check one shard's candidates against the contract; split them into valid and rejected."""
    out, c = Path(out), recipe.data.contract
    index, shard = prepared["index"], Path(prepared["shard"])
    df = pd.read_parquet(prepared["candidates"])
    rules = rules_mod.rules(c)
    row_rules = [r for r in rules if r.row_level]
    gx_result = gx_contract.validate(df, rules) if len(df) else {"success": True, "results": []}
    ok, reasons = rules_mod.row_reasons(df, c)
    valid = df[ok].drop(columns=["decode_error"])
    valid = valid.assign(shard=os.path.relpath(shard, out))
    rejected = _quarantine_rows(df[~ok], [reasons[i] for i in sorted(reasons)], shard,
                                "validate", row_rules)
    paths = {"valid": _part(out, index, ".valid.parquet"),
             "rejected": _part(out, index, ".rejected.parquet"),
             "gx": _part(out, index, ".gx.json"), "ref": _part(out, index, ".ref.json")}
    shards.write_arrow(paths["valid"], pa.Table.from_pandas(valid, shards.MANIFEST_SCHEMA,
                                                            preserve_index=False))
    shards.write_table(paths["rejected"], rejected, shards.QUARANTINE_SCHEMA)
    atomic.write_json(paths["gx"], gx_result)
    atomic.write_json(paths["ref"], {"index": index, "stamp": stamp(recipe)})
    summary = rules_mod.summarize(shard.name, len(df), valid, c)
    return {"index": index, "summary": summary.to_dict(), **{k: str(v) for k, v in paths.items()}}


def _read(paths: list[str], schema: pa.Schema) -> pa.Table:
    tables = [pq.read_table(p, schema=schema) for p in paths]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def merge(recipe: Recipe, prepared: list[dict[str, Any]], validated: list[dict[str, Any]],
          out: Path) -> dict[str, Any]:
    """Merge shard results once: cross-shard duplicates, batch checks, manifest, report."""
    out, c = Path(out), recipe.data.contract
    prepared = sorted(prepared, key=lambda p: p["index"])
    validated = sorted(validated, key=lambda v: v["index"])
    manifest = _read([v["valid"] for v in validated], shards.MANIFEST_SCHEMA).to_pandas()
    dup = manifest["sha256"].duplicated(keep="first")
    dup_rows: list[dict[str, Any]] = []
    rule = next(r for r in rules_mod.rules(c) if r.reason == "duplicate_sha256")
    for shard_rel, group in manifest[dup].groupby("shard", sort=True):
        dup_rows += _quarantine_rows(group, [["duplicate_sha256"]] * len(group),
                                     out / shard_rel, "merge", [rule])
    removed = manifest[dup]
    manifest = manifest[~dup]
    quarantine = pa.concat_tables([
        _read([p["rejects"] for p in prepared], shards.QUARANTINE_SCHEMA),
        _read([v["rejected"] for v in validated], shards.QUARANTINE_SCHEMA),
        pa.Table.from_pylist(dup_rows, schema=shards.QUARANTINE_SCHEMA),
    ])
    inputs = sum(p["inputs"] for p in prepared)
    if inputs != len(manifest) + quarantine.num_rows:
        raise RuntimeError(f"counts do not add up: {inputs} inputs != {len(manifest)} valid + "
                           f"{quarantine.num_rows} quarantined; nothing was written")
    summaries = [v["summary"] for v in validated]
    word_sum = sum(s["word_sum"] for s in summaries) - int(removed["word_count"].sum())
    truncated = (sum(s["truncated"] for s in summaries)
                 - int((removed["token_count"] > c.max_tokens).sum()))
    verdict = rules_mod.merge_verdict(inputs, quarantine.num_rows, len(manifest), word_sum,
                                      truncated, c)
    reasons = Counter(r for rs in quarantine.column("reasons").to_pylist() for r in rs)
    gx_results = [json.loads(Path(v["gx"]).read_text()) for v in validated]
    notes = sorted({p["tokenizer_note"] for p in prepared if p.get("tokenizer_note")})
    # No recipe hash here: it covers execution settings (task runner, workers) too, and the
    # dataset's bytes, hence its DVC hash, must not depend on how many workers built it.
    report = {
        "recipe": recipe.name, "passed": verdict["passed"],
        "why": verdict["why"], "inputs": inputs, "valid": len(manifest),
        "quarantined": quarantine.num_rows, "reasons": dict(sorted(reasons.items())),
        "merged_checks": verdict["checks"], "expectations": gx_contract.summarize(gx_results),
        "shards": len(validated), "tokenizer": c.tokenizer, "tokenizer_notes": notes,
        "truncation_rate": verdict["truncation_rate"],
        "caption_word_mean": verdict["caption_word_mean"], "stamp": stamp(recipe),
    }
    paths = {"manifest": out / shards.MANIFEST, "quarantine": out / shards.QUARANTINE,
             "report": out / "contract.json", "summary": out / "contract.md"}
    shards.write_arrow(paths["manifest"], pa.Table.from_pandas(
        manifest, shards.MANIFEST_SCHEMA, preserve_index=False))
    shards.write_arrow(paths["quarantine"], quarantine)
    atomic.write_json(paths["report"], report)
    atomic.write_text(paths["summary"], markdown(report))
    return {**{k: str(v) for k, v in paths.items()},
            **{k: report[k] for k in ("passed", "why", "inputs", "valid", "quarantined",
                                      "reasons", "truncation_rate", "caption_word_mean")},
            "rejection_rate": verdict["rejection_rate"]}


def markdown(report: dict[str, Any]) -> str:
    """A readable summary of the contract report."""
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [f"# Data contract: {verdict}", "",
             f"Recipe `{report['recipe']}`, "
             f"{report['shards']} shard(s), tokenizer `{report['tokenizer']}`.", "",
             f"- inputs: {report['inputs']}", f"- valid: {report['valid']}",
             f"- quarantined: {report['quarantined']}",
             f"- caption words, mean: {report['caption_word_mean']:.1f}",
             f"- token truncation rate: {report['truncation_rate']:.4f}", ""]
    lines += [f"**Why it failed:** {w}" for w in report["why"]] + ([""] if report["why"] else [])
    lines += [f"> {n}" for n in report["tokenizer_notes"]]
    lines += ["## Expectations (Great Expectations, per shard, summed)", "",
              "| reason | expectation | column | unexpected | of | shards failed |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {e['reason']} | {e['expectation']} | {e['column']} | {e['unexpected_count']} "
              f"| {e['element_count']} | {e['shards_failed']} |" for e in report["expectations"]]
    lines += ["", "## Batch checks (merged from shard summaries)", "",
              "| check | value | bound | ok |", "|---|---|---|---|"]
    for ch in report["merged_checks"]:
        bound = f"[{ch['min']}, {ch['max']}]" if "min" in ch else f"<= {ch['max']}"
        lines.append(f"| {ch['check']} | {ch['value']:.4g} | {bound} | "
                     f"{'yes' if ch['success'] else 'NO'} |")
    lines += ["", "## Quarantine reasons", "", "| reason | count |", "|---|---|"]
    lines += [f"| {r} | {n} |" for r, n in report["reasons"].items()]
    return "\n".join(lines) + "\n"


def prepare_all(recipe: Recipe, raw: Path) -> list[dict[str, Any]]:
    """Prepare every planned shard in this process (the DVC prepare stage)."""
    chunks = plan(recipe)
    prune(raw, raw, len(chunks))
    return [prepare_chunk(recipe, chunk, i, raw) for i, chunk in enumerate(chunks)]


def validate_all(recipe: Recipe, raw: Path, out: Path) -> dict[str, Any]:
    """Validate and merge every prepared shard in this process (the DVC validate stage)."""
    prepared = load_prepared(raw)
    prune(out, out, len(prepared))
    validated = [validate_shard(recipe, p, out) for p in prepared]
    return merge(recipe, prepared, validated, out)


def outputs_current(recipe: Recipe, raw: Path, out: Path, planned: int) -> tuple[bool, ...]:
    """Whether the prepare, validate and merge outputs are all on disk and were built from
    this recipe's data settings and this code (their ref files and report carry that stamp)."""
    want = stamp(recipe)

    def current(ref: Path, others: list[Path]) -> bool:
        return (ref.exists() and json.loads(ref.read_text()).get("stamp") == want
                and all(p.exists() for p in others))

    prepared = all(current(p["ref"], [p["shard"], p["candidates"], p["rejects"]])
                   for p in map(lambda i: _paths(raw, i), range(planned)))
    validated = all(current(_part(out, i, ".ref.json"), [_part(out, i, s) for s in
                                                         (".valid.parquet", ".rejected.parquet",
                                                          ".gx.json")])
                    for i in range(planned))
    merged = current(out / "contract.json", [out / shards.MANIFEST, out / shards.QUARANTINE])
    return prepared, validated, prepared and validated and merged
