"""The pipeline: data -> vae (when the recipe trains one) -> pretrain, under one MLflow
parent run whose child runs are the stages.

    lens run tiny                      # what `make run` runs
    lens run lens-3.8b --set launch.nproc_per_node=8
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, tags

from flows.data import data_flow, shared_api, task_runner
from lens_model.recipe import load_recipe
from tasks import data as data_tasks
from tasks.pretrain import pretrain
from tasks.vae import vae_dir, vae_stage


@flow(name="lens-pipeline", version="1", log_prints=True)
def pipeline_flow(recipe: str = "tiny", overrides: list[str] | None = None,
                  repo: str | None = None) -> dict[str, Any]:
    rec = load_recipe(recipe, overrides)
    tree = rec.model_dump(mode="json")
    parent = data_tasks.open_parent(tree, repo or ".")
    try:
        data = data_flow.with_options(task_runner=task_runner(rec.data))(
            recipe, overrides or [], repo, parent)
        dataset = str(Path(data["manifest"]).parent)
        # a cache hit must not stand in for a trained VAE folder that was deleted
        stale = rec.vae.source == "train" and not vae_dir(rec, data["dvc_hash"]).is_dir()
        vae = vae_stage.with_options(refresh_cache=stale)(tree, dataset, data["dvc_hash"], parent)
        trained = pretrain(tree, dataset, vae, data["dvc_hash"], parent)
    except BaseException:
        data_tasks.close_parent(parent, {}, "FAILED")
        raise
    summary = {"dvc_hash": data["dvc_hash"], "vae_dir": vae,
               "model_dir": trained.get("model_dir", ""), "pretrain_run_id": trained["run_id"]}
    data_tasks.close_parent(parent, summary)
    return {**data, **summary, "parent_run_id": parent, "pretrain_job": trained["job"],
            "run_dir": trained["run_dir"]}


def run(recipe: str, overrides: list[str] | None = None, repo: str | None = None) -> dict[str, Any]:
    rec = load_recipe(recipe, overrides)
    with shared_api(rec.data), tags(f"recipe:{rec.name}", f"recipe-hash:{rec.hash()}"):
        return pipeline_flow(recipe, overrides or [], repo)
