"""The contract: GX's suite and the vectorised row rules agree, reason by reason."""

from __future__ import annotations

import pandas as pd
import pytest

from lens_model.data.contract import merge_verdict, row_reasons, rules
from lens_model.recipe import load_recipe
from tasks import gx_contract

C = load_recipe("tiny").data.contract


def _row(i: int, **change: object) -> dict:
    row = {"key": f"k{i}", "caption": "word " * 110, "word_count": 110, "token_count": 140,
           "width": 64, "height": 64, "area": 4096, "aspect": 1.0, "bucket": "64x64",
           "sha256": f"{i:064x}", "source": "t", "decodable": True, "blur": 500.0,
           "entropy": 2.0, "luminance": 0.5, "decode_error": None}
    return row | change


# One row per row rule, each breaking exactly that rule; the reason it must be rejected for.
BROKEN = [
    ("undecodable_image", dict(decodable=False, width=None, height=None, area=None,
                               aspect=None, bucket=None, blur=None, entropy=None, luminance=None,
                               decode_error="truncated_image")),
    ("empty_caption", dict(caption=None, word_count=None, token_count=None)),
    ("caption_words_out_of_range", dict(word_count=10_000, token_count=12_000)),
    ("area_below_min", dict(width=16, height=16, area=256, bucket="32x32")),
    ("aspect_out_of_range", dict(width=192, height=32, area=6144, aspect=6.0)),
    ("no_bucket", dict(bucket=None)),
    ("duplicate_sha256", dict(sha256=f"{0:064x}")),
    ("too_blurry", dict(blur=0.0)),
    ("low_entropy", dict(entropy=0.0)),
    ("luminance_out_of_range", dict(luminance=0.99)),
]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    rows = [_row(0), _row(1)] + [_row(i + 2, **change) for i, (_, change) in enumerate(BROKEN)]
    return pd.DataFrame(rows)


def test_row_rules_name_the_one_broken_rule(frame: pd.DataFrame) -> None:
    ok, reasons = row_reasons(frame, C)
    assert ok.tolist() == [True, True] + [False] * len(BROKEN)
    expected = ["truncated_image"] + [reason for reason, _ in BROKEN[1:]]
    assert [reasons[i + 2] for i in range(len(BROKEN))] == [[r] for r in expected]


def test_gx_suite_agrees_with_row_rules(frame: pd.DataFrame) -> None:
    result = gx_contract.validate(frame, rules(C))
    assert not result["success"]
    by_reason = {r["lens_reason"]: r for r in result["results"]}
    assert list(by_reason) == [r.reason for r in rules(C)]  # in rule order, every rule
    for rule in rules(C):
        res = by_reason[rule.reason]
        assert res["expectation_config"]["kwargs"]["column"] == rule.column
    # GX counts each expectation on its own: the undecodable row has no bucket either, and
    # both members of a duplicate pair are "unexpected" (the row rules reject only the later)
    gx_counts = {reason: 1 for reason, _ in BROKEN} | {"no_bucket": 2, "duplicate_sha256": 2}
    for reason, count in gx_counts.items():
        assert by_reason[reason]["result"]["unexpected_count"] == count, reason
        assert not by_reason[reason]["success"], reason
    # 1 row of 12 over max_tokens: GX's "mostly" reports it; the merged batch check decides
    assert by_reason["tokens_truncated"]["result"]["unexpected_count"] == 1


def test_batch_checks_fail_the_batch_and_say_why() -> None:
    verdict = merge_verdict(inputs=100, quarantined=10, valid=90, word_sum=90 * 50,
                            truncated=5, c=C)
    assert not verdict["passed"]
    why = " ".join(verdict["why"])
    assert "rejection_rate = 0.1" in why and "caption_word_mean = 50" in why
    assert "token_truncation_rate" in why
    assert merge_verdict(100, 0, 100, 100 * 110, 0, C)["passed"]
