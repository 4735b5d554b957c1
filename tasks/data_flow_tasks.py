"""Prefect tasks of the data flow: versioned, cached on their inputs and their source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

from lens_model.recipe import Recipe
from tasks import dataset, dvc_ops, tracking

VERSION = "1"


def _build_code(context: Any, parameters: dict[str, Any]) -> str:
    return dataset.code_fingerprint()  # TASK_SOURCE sees only the task's own few lines


CACHED = {"version": VERSION, "persist_result": True,
          "cache_policy": INPUTS + TASK_SOURCE + CachePolicy.from_cache_key_fn(_build_code)}


@task(name="workspace", version=VERSION)
def workspace(recipe: Recipe, repo: str | None) -> dict[str, str]:
    """Find the DVC repo, write params.yaml from the recipe, return where data goes."""
    root = dvc_ops.repo_root(repo)
    dvc_ops.write_params(root, recipe)
    return {"root": str(root), "raw": str(root / dvc_ops.RAW), "out": str(root / dvc_ops.DATASET)}


@task(name="plan", version=VERSION)
def plan(recipe: Recipe, raw: str, out: str) -> list[dict[str, Any]]:
    """Chunk references, one per shard; files of shards no longer planned are removed."""
    chunks = dataset.plan(recipe)
    dataset.prune(Path(raw), Path(out), len(chunks))
    return chunks


@task(name="prepare-shard", task_run_name="prepare-{index}", **CACHED)
def prepare(recipe: Recipe, chunk: dict[str, Any], index: int, raw: str) -> dict[str, Any]:
    return dataset.prepare_chunk(recipe, chunk, index, Path(raw))


@task(name="validate-shard", task_run_name="validate-{prepared[index]}", **CACHED)
def validate(recipe: Recipe, prepared: dict[str, Any], out: str) -> dict[str, Any]:
    return dataset.validate_shard(recipe, prepared, Path(out))


@task(name="merge", **CACHED)
def merge(recipe: Recipe, prepared: list[dict[str, Any]], validated: list[dict[str, Any]],
          out: str) -> dict[str, Any]:
    return dataset.merge(recipe, prepared, validated, Path(out))


@task(name="open-parent-run", version=VERSION)
def open_parent(recipe: Recipe, root: str = ".") -> str:
    return tracking.open_parent(recipe, cwd=root)


@task(name="close-parent-run", version=VERSION)
def close_parent(run_id: str, summary: dict[str, Any], status: str = "FINISHED",
                 metrics: dict[str, float] | None = None, scores_run: str = "") -> None:
    tracking.close_parent(run_id, summary, status, metrics, scores_run)


@task(name="version", version=VERSION)
def version(root: str) -> dict[str, Any]:
    """dvc commit + push; idempotent, so it runs every time and records the workspace as is."""
    return dvc_ops.commit_and_push(Path(root))


@task(name="track", version=VERSION)
def track(recipe: Recipe, merged: dict[str, Any], versioned: dict[str, Any],
          seconds: dict[str, float], out: str, root: str, parent_run_id: str = "") -> str:
    """Log the MLflow data run and publish the contract summary as a Prefect artifact."""
    run_id = tracking.log_data_run(recipe, merged, versioned, seconds, out, cwd=root,
                                   parent_run_id=parent_run_id)
    create_markdown_artifact(key=f"data-contract-{recipe.name}",
                             markdown=Path(merged["summary"]).read_text()
                             + f"\n\nMLflow run: `{run_id}`; DVC hash: `{versioned['dvc_hash']}`\n",
                             description="Data contract of the last data flow run")
    return run_id
