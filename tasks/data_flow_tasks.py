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
def workspace(tree: dict[str, Any], repo: str | None) -> dict[str, str]:
    """Find the DVC repo, write params.yaml from the recipe, return where data goes."""
    root = dvc_ops.repo_root(repo)
    dvc_ops.write_params(root, Recipe.model_validate(tree))
    return {"root": str(root), "raw": str(root / dvc_ops.RAW), "out": str(root / dvc_ops.DATASET)}


@task(name="plan", version=VERSION)
def plan(tree: dict[str, Any], raw: str, out: str) -> list[dict[str, Any]]:
    """Chunk references, one per shard; files of shards no longer planned are removed."""
    chunks = dataset.plan(Recipe.model_validate(tree))
    dataset.prune(Path(raw), Path(out), len(chunks))
    return chunks


@task(name="prepare-shard", task_run_name="prepare-{index}", **CACHED)
def prepare(tree: dict[str, Any], chunk: dict[str, Any], index: int, raw: str) -> dict[str, Any]:
    return dataset.prepare_chunk(Recipe.model_validate(tree), chunk, index, Path(raw))


@task(name="validate-shard", task_run_name="validate-{prepared[index]}", **CACHED)
def validate(tree: dict[str, Any], prepared: dict[str, Any], out: str) -> dict[str, Any]:
    return dataset.validate_shard(Recipe.model_validate(tree), prepared, Path(out))


@task(name="merge", **CACHED)
def merge(tree: dict[str, Any], prepared: list[dict[str, Any]], validated: list[dict[str, Any]],
          out: str) -> dict[str, Any]:
    return dataset.merge(Recipe.model_validate(tree), prepared, validated, Path(out))


@task(name="open-parent-run", version=VERSION)
def open_parent(tree: dict[str, Any], root: str = ".") -> str:
    return tracking.open_parent(Recipe.model_validate(tree), cwd=root)


@task(name="close-parent-run", version=VERSION)
def close_parent(run_id: str, summary: dict[str, Any], status: str = "FINISHED") -> None:
    tracking.close_parent(run_id, summary, status)


@task(name="version", version=VERSION)
def version(root: str) -> dict[str, Any]:
    """dvc commit + push; idempotent, so it runs every time and records the workspace as is."""
    return dvc_ops.commit_and_push(Path(root))


@task(name="track", version=VERSION)
def track(tree: dict[str, Any], merged: dict[str, Any], versioned: dict[str, Any],
          seconds: dict[str, float], out: str, root: str, parent_run_id: str = "") -> str:
    """Log the MLflow data run and publish the contract summary as a Prefect artifact."""
    recipe = Recipe.model_validate(tree)
    run_id = tracking.log_data_run(recipe, merged, versioned, seconds, out, cwd=root,
                                   parent_run_id=parent_run_id)
    create_markdown_artifact(key=f"data-contract-{recipe.name}",
                             markdown=Path(merged["summary"]).read_text()
                             + f"\n\nMLflow run: `{run_id}`; DVC hash: `{versioned['dvc_hash']}`\n",
                             description="Data contract of the last data flow run")
    return run_id
