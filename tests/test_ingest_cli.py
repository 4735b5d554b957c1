"""`lens data ingest` end to end: hostile folders, tars and Parquet -> contract -> loader."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lens import cli
from lens_model.buckets import buckets_for
from lens_model.data.loader import PackedLoader
from lens_model.recipe import load_recipe
from tests import hostile

# The hostile images are 64x64 with 12-word captions: loosen the tiny contract to let the
# good ones through, so the test sees both valid rows and every quarantine reason.
LOOSE = ["data.contract.caption_words_min=1", "data.contract.caption_mean_min=0",
         "data.contract.max_rejection_rate=1.0", "data.contract.min_area=1024",
         "data.samples_per_shard=8"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("ingest")
    hostile.build_folder(root / "folder", root / "outside")
    hostile.build_tars(root / "tars")
    hostile.build_parquet(root / "parquet")
    tars = sorted((root / "tars").glob("*.tar"))
    return root, [root / "folder", *tars, *sorted((root / "parquet").glob("*.parquet"))]


def _ingest(paths: list[Path], out: Path, capsys, *extra: str) -> tuple[int, dict]:
    args = ["data", "ingest", *map(str, paths), "--out", str(out), "--json", *extra]
    code = cli.main(args)
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_ingest_quarantines_hostile_input_and_counts_add_up(inputs, tmp_path, capsys) -> None:
    root, paths = inputs
    before = hostile.snapshot(root)
    out = tmp_path / "out"
    code, result = _ingest(paths, out, capsys, "--recipe", "tiny",
                           *sum((["--set", s] for s in LOOSE), []))
    assert code == 0, result
    assert set(result) >= {"inputs", "valid", "quarantined", "reasons", "manifest", "quarantine"}
    assert result["inputs"] == result["valid"] + result["quarantined"] and result["valid"] > 0
    quarantine = pd.read_parquet(result["quarantine"])
    assert len(quarantine) == result["quarantined"]
    assert sum(result["reasons"].values()) >= result["quarantined"]
    expected = {"symlink", "unsafe_tar_path", "truncated_tar", "missing_caption",
                "missing_image", "caption_not_utf8", "caption_nul_bytes", "empty_caption",
                "decompression_bomb", "truncated_image", "not_an_image", "empty_file",
                "undecodable_image", "duplicate_sha256", "caption_words_out_of_range",
                "area_below_min", "aspect_out_of_range"}
    assert expected <= set(result["reasons"]), expected - set(result["reasons"])
    assert quarantine["detail"].str.len().min() > 0
    dup = quarantine[quarantine["reasons"].map(lambda r: "duplicate_sha256" in r)]
    assert dup["image_bytes"].notna().all()  # original bytes are kept
    assert hostile.snapshot(root) == before  # nothing written next to the inputs

    # The valid rows are a dataset the training loader reads.
    recipe = load_recipe("tiny", LOOSE)
    loader = PackedLoader(out, buckets_for(recipe.buckets), recipe.buckets.token_px,
                          recipe.loader.token_budget, seed=0, num_workers=0)
    manifest = pd.read_parquet(result["manifest"])
    seen = {k for batch in (next(iter(loader)),) for k in batch.keys}
    assert seen and seen <= set(manifest["key"])


def test_default_recipe_fails_the_batch_and_says_why(inputs, tmp_path, capsys) -> None:
    root, paths = inputs
    code, result = _ingest(paths, tmp_path / "strict", capsys)  # lens-3.8b: 384^2 minimum
    assert code == 1 and result["passed"] is False
    assert result["inputs"] == result["valid"] + result["quarantined"]
    # rejected by the contract after normalisation to RGB, yet quarantined with its own bytes
    quarantine = pd.read_parquet(result["quarantine"])
    cmyk = quarantine[quarantine["source"].str.endswith("cmyk.jpg")].iloc[0]
    assert "area_below_min" in cmyk["reasons"]
    assert cmyk["image_bytes"] == (root / "folder" / "cmyk.jpg").read_bytes()
    report = (tmp_path / "strict" / "contract.md").read_text()
    assert "FAILED" in report and "rejection_rate" in report


def test_missing_input_path_is_refused_clearly(tmp_path, capsys) -> None:
    code = cli.main(["data", "ingest", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "nope" in capsys.readouterr().err
