"""The data contract's rules, defined once.

``rules(contract)`` is the single definition. ``tasks/contract.py`` turns it into a Great
Expectations suite (the report of record); :func:`row_reasons` evaluates the same row rules
with vectorised pandas to decide which rows go to quarantine; :func:`merge_verdict` applies
the cross-shard rules (uniqueness across shards, caption-length mean, truncation rate,
rejection rate) from per-shard summaries, so they are computed once, not per row again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from lens_model.recipe import ContractSection

Kind = Literal["not_null", "between", "is_true", "unique", "mean_between", "at_most_share"]


@dataclass(frozen=True)
class Rule:
    """One expectation. ``reason`` is the quarantine code of a row that breaks it."""

    reason: str
    column: str
    kind: Kind
    min: float | None = None
    max: float | None = None
    row_level: bool = True  # rows breaking it are quarantined; else it judges the batch
    mostly: float = 1.0

    def describe(self) -> str:
        bounds = {"between": f" in [{self.min}, {self.max}]", "mean_between":
                  f" mean in [{self.min}, {self.max}]", "at_most_share":
                  f" <= {self.max} for at least {self.mostly:.0%} of rows"}.get(self.kind, "")
        return f"{self.column} {self.kind}{bounds}"


def rules(c: ContractSection) -> list[Rule]:
    """The contract: every rule of the data section, in report order."""
    return [
        Rule("undecodable_image", "decodable", "is_true"),
        Rule("empty_caption", "caption", "not_null"),
        Rule("caption_words_out_of_range", "word_count", "between",
             c.caption_words_min, c.caption_words_max),
        Rule("area_below_min", "area", "between", c.min_area, None),
        Rule("aspect_out_of_range", "aspect", "between", c.aspect_min, c.aspect_max),
        Rule("no_bucket", "bucket", "not_null"),
        Rule("duplicate_sha256", "sha256", "unique"),
        Rule("too_blurry", "blur", "between", c.blur_min, None),
        Rule("low_entropy", "entropy", "between", c.entropy_min, None),
        Rule("luminance_out_of_range", "luminance", "between", c.luminance_min, c.luminance_max),
        Rule("caption_mean_out_of_range", "word_count", "mean_between",
             c.caption_mean_min, c.caption_mean_max, row_level=False),
        Rule("tokens_truncated", "token_count", "at_most_share", None, c.max_tokens,
             row_level=False, mostly=1.0 - c.max_truncation_rate),
    ]


def row_reasons(df: pd.DataFrame, c: ContractSection) -> tuple[np.ndarray, dict[int, list[str]]]:
    """Which rows pass the row rules, and for each failing row (by position) its reasons.

    An undecodable row carries only its decode error (its other columns are empty), and a row
    without a caption only ``empty_caption``, so each reject names its real cause.
    """
    undecodable = ~df["decodable"].fillna(False).astype(bool).to_numpy()
    no_caption = df["caption"].isna().to_numpy()
    found: dict[str, np.ndarray] = {}
    for rule in rules(c):
        if not rule.row_level or rule.kind == "is_true":
            continue
        col = df[rule.column]
        if rule.kind == "not_null":
            bad = col.isna().to_numpy()
        elif rule.kind == "unique":
            bad = (col.notna() & col.duplicated(keep="first")).to_numpy()
        else:  # between; a null value is judged by its own not-null rule
            lo = -np.inf if rule.min is None else rule.min
            hi = np.inf if rule.max is None else rule.max
            bad = (col.notna() & ~col.between(lo, hi)).to_numpy()
        if rule.column == "word_count":
            bad = bad & ~no_caption
        found[rule.reason] = bad & ~undecodable
    failing = undecodable | np.logical_or.reduce(list(found.values()))
    decode_errors = df["decode_error"] if "decode_error" in df else pd.Series([None] * len(df))
    reasons: dict[int, list[str]] = {}
    for i in np.flatnonzero(failing):
        if undecodable[i]:
            reasons[int(i)] = [decode_errors.iat[i] or "undecodable_image"]
        else:
            reasons[int(i)] = [reason for reason, mask in found.items() if mask[i]]
    return ~failing, reasons


@dataclass
class ShardSummary:
    """What the merge needs from one validated shard, instead of its rows."""

    shard: str
    candidates: int
    valid: int
    word_sum: int
    truncated: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(shard: str, candidates: int, valid: pd.DataFrame, c: ContractSection) -> ShardSummary:
    return ShardSummary(
        shard=shard,
        candidates=candidates,
        valid=len(valid),
        word_sum=int(valid["word_count"].sum()),
        truncated=int((valid["token_count"] > c.max_tokens).sum()),
    )


def merge_verdict(inputs: int, quarantined: int, valid: int, word_sum: int, truncated: int,
                  c: ContractSection) -> dict[str, Any]:
    """Batch-level checks from merged summaries: the contract passes or fails as a whole."""
    mean_words = word_sum / valid if valid else 0.0
    truncation_rate = truncated / valid if valid else 0.0
    rejection_rate = quarantined / inputs if inputs else 0.0
    checks = [
        {"check": "rejection_rate", "value": rejection_rate, "max": c.max_rejection_rate,
         "success": rejection_rate <= c.max_rejection_rate},
        {"check": "caption_word_mean", "value": mean_words,
         "min": c.caption_mean_min, "max": c.caption_mean_max,
         "success": valid > 0 and c.caption_mean_min <= mean_words <= c.caption_mean_max},
        {"check": "token_truncation_rate", "value": truncation_rate,
         "max": c.max_truncation_rate, "success": truncation_rate <= c.max_truncation_rate},
    ]
    why = [_why(ch) for ch in checks if not ch["success"]]
    return {"passed": not why, "why": why, "checks": checks, "caption_word_mean": mean_words,
            "truncation_rate": truncation_rate, "rejection_rate": rejection_rate}


def _why(check: dict[str, Any]) -> str:
    bounds = f"[{check['min']}, {check['max']}]" if "min" in check else f"<= {check['max']}"
    return f"{check['check']} = {check['value']:.4g}, allowed {bounds}"
