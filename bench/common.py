"""What the pipeline benches share: their arguments, the recipe, one timed pipeline run, the JSON.

Importing this module sets nothing: :func:`load` applies the project's defaults, so a bench
that must change the environment first (``pipeline_bench``'s fresh ``LENS_HOME``) still can.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from lens_model import atomic, defaults
from lens_model.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    """``--recipe``, ``--set``, ``--repo`` and ``--out`` (``bench/results/NAME.json``)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--recipe", default="small")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--repo", default=str(REPO), help="the DVC repo the data flow uses")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / f"{name}.json"))
    return ap


def load(recipe: str, overrides: list[str]) -> Recipe:
    """Apply the project's defaults (offline, state under ``LENS_HOME``), then load the recipe.

    Call it before importing flows, tasks or models: Prefect, MLflow and the HF libraries read
    those variables on import."""
    defaults.apply()
    return load_recipe(recipe, overrides)


def run_pipeline(recipe: str, overrides: list[str], repo: str) -> tuple[dict[str, Any], float]:
    """Run the recipe's pipeline in-process: its result and its wall seconds (import excluded)."""
    from flows.training_pipeline import run

    start = time.perf_counter()
    result = run(recipe, overrides, repo)
    return result, time.perf_counter() - start


def header(benchmark: str, args: argparse.Namespace, recipe: Recipe) -> dict[str, Any]:
    """The keys every pipeline bench's JSON opens with."""
    return {"benchmark": benchmark, "recipe": args.recipe, "recipe_hash": recipe.hash(),
            "overrides": args.overrides, "cpus": os.cpu_count()}


def write_json(path: str | Path, out: dict[str, Any]) -> None:
    """``out`` as indented JSON at ``path``, written atomically (numpy floats as floats)."""
    atomic.write_text(path, json.dumps(out, indent=2, default=float) + "\n")
