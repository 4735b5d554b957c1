"""The data contract as a Great Expectations 1.x suite, built from lens_model's rules."""

from __future__ import annotations

import functools
import threading
from typing import Any

import pandas as pd

from lens_model.data.contract import Rule

# GX keeps its current context in a process-wide global, so contexts per thread collide
# ("suite has changed since it was last saved"): one context, used under one lock. Shards
# validate in parallel across processes (the Dask task runner), not threads.
_LOCK = threading.RLock()
# rule set -> (validation definition, {expectation id: rule}); GX reorders its results
_VALIDATIONS: dict[tuple[Rule, ...], tuple[Any, dict[str, Rule]]] = {}


@functools.cache
def _context() -> Any:
    import great_expectations as gx  # ~2 s import: only when a contract is checked
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


def expectation(rule: Rule) -> Any:
    """The GX expectation that checks ``rule``."""
    import great_expectations.expectations as gxe

    col = rule.column
    if rule.kind == "not_null":
        return gxe.ExpectColumnValuesToNotBeNull(column=col)
    if rule.kind == "is_true":
        return gxe.ExpectColumnValuesToBeInSet(column=col, value_set=[True])
    if rule.kind == "unique":
        return gxe.ExpectColumnValuesToBeUnique(column=col)
    if rule.kind == "between":
        return gxe.ExpectColumnValuesToBeBetween(column=col, min_value=rule.min, max_value=rule.max)
    if rule.kind == "mean_between":
        return gxe.ExpectColumnMeanToBeBetween(column=col, min_value=rule.min, max_value=rule.max)
    if rule.kind == "at_most_share":
        return gxe.ExpectColumnValuesToBeBetween(column=col, max_value=rule.max, mostly=rule.mostly)
    raise ValueError(f"rule {rule.reason}: unknown kind {rule.kind!r}")


def _validation(rules: tuple[Rule, ...]) -> tuple[Any, dict[str, Rule]]:
    """One validation definition per distinct rule set (reused across shards), and which
    rule each of its expectations checks."""
    import great_expectations as gx

    ctx = _context()
    if rules in _VALIDATIONS:
        return _VALIDATIONS[rules]
    name = f"lens-contract-{abs(hash(rules)):x}"
    source = ctx.data_sources.add_pandas(name)
    batch = source.add_dataframe_asset("manifest").add_batch_definition_whole_dataframe("all")
    suite = gx.ExpectationSuite(name=name)
    for rule in rules:
        suite.add_expectation(expectation(rule))
    suite = ctx.suites.add(suite)
    by_id = {str(e.id): rule for e, rule in zip(suite.expectations, rules, strict=True)}
    definition = gx.ValidationDefinition(name=name, data=batch, suite=suite)
    _VALIDATIONS[rules] = (ctx.validation_definitions.add(definition), by_id)
    return _VALIDATIONS[rules]


def _columns(df: pd.DataFrame, rules: list[Rule]) -> pd.DataFrame:
    """The columns the rules read, numerics widened to 64 bits.

    GX vectorises range checks only for int64/float64 columns (narrower ones go through a
    per-value Python map, ~10x slower), and it fingerprints every column it is given.
    """
    cols = df[list(dict.fromkeys(r.column for r in rules))]
    wide = {c: ("float64" if pd.api.types.is_float_dtype(t) else "int64")
            for c, t in cols.dtypes.items()
            if pd.api.types.is_numeric_dtype(t) and not pd.api.types.is_bool_dtype(t)}
    return cols.astype(wide)


def validate(df: pd.DataFrame, rules: list[Rule]) -> dict[str, Any]:
    """Run the suite of ``rules`` over ``df``; returns GX's result as a JSON-able dict."""
    df = _columns(df, rules)
    with _LOCK:
        definition, by_id = _validation(tuple(rules))
        result = definition.run(batch_parameters={"dataframe": df}, result_format="SUMMARY")
    raw = result.to_json_dict()
    # Keep what the data decides, in rule order; GX's run ids, times and batch ids would make
    # every build's report, and so the dataset's DVC hash, differ for the same data.
    results = []
    for res in raw["results"]:
        cfg = res["expectation_config"]
        kwargs = {k: v for k, v in cfg["kwargs"].items() if k != "batch_id"}
        results.append({"lens_reason": by_id[cfg["id"]].reason, "success": res["success"],
                        "expectation_config": {"type": cfg["type"], "kwargs": kwargs},
                        "result": res.get("result", {})})
    order = {rule.reason: i for i, rule in enumerate(rules)}
    results.sort(key=lambda r: order[r["lens_reason"]])
    return {"success": raw["success"], "statistics": raw["statistics"], "results": results}


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per expectation, unexpected and element counts summed over several shard results."""
    table: dict[str, dict[str, Any]] = {}
    for result in results:
        for res in result["results"]:
            cfg = res["expectation_config"]
            row = table.setdefault(res["lens_reason"], {
                "reason": res["lens_reason"], "expectation": cfg["type"],
                "column": cfg["kwargs"].get("column"), "element_count": 0,
                "unexpected_count": 0, "shards_failed": 0})
            r = res.get("result", {})
            row["element_count"] += int(r.get("element_count", 0) or 0)
            row["unexpected_count"] += int(r.get("unexpected_count", 0) or 0)
            row["shards_failed"] += 0 if res["success"] else 1
    return list(table.values())
