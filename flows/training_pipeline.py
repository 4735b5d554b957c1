"""The pipeline: data -> vae (when the recipe trains one) -> pretrain -> rl -> reasoner ->
search -> distill -> evaluate -> register -> promote, under one MLflow parent run whose child
runs are the stages. The RL model is registered as ``<model_name>`` (with its reasoner) and
its distilled student as ``<model_name>-turbo``; each is gated and promoted on its own.

    lens run tiny                      # what `make run` runs
    lens run lens-3.8b --set launch.nnodes=1 --set launch.nproc_per_node=8   # one 8-GPU node

A recipe of several nodes trains through a rendered cluster job (`lens train render`).
"""

from __future__ import annotations

import time
from contextlib import suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, tags

from flows.data import data_flow, shared_api, task_runner
from lens_model.recipe import load_recipe
from tasks import data_flow_tasks as data_tasks
from tasks import release_tasks
from tasks.distill_stage import distill
from tasks.evaluate import evaluate_stage
from tasks.pretrain_stage import pretrain
from tasks.prompt_search import search_task
from tasks.reasoner_stage import reasoner_dir, reasoner_stage
from tasks.registry import register, turbo_entry
from tasks.report import failure_report, pipeline_report
from tasks.rl_prompts import outputs_current, rl_prompts_task
from tasks.rl_stage import rl
from tasks.vae_stage import vae_dir, vae_stage

STAGES = ("data", "vae", "pretrain", "rl", "reasoner", "search", "distill", "evaluate",
          "register", "promote")


@flow(name="lens-pipeline", version="1", log_prints=True)
def pipeline_flow(recipe: str = "tiny", overrides: list[str] | None = None,
                  repo: str | None = None) -> dict[str, Any]:
    rec = load_recipe(recipe, overrides)
    stages: dict[str, float] = {}  # wall seconds per stage
    compute: dict[str, float] = {}  # of which the stage's own work (0 when its cache hit)
    clock = [time.perf_counter()]

    def lap(name: str, *states: Any) -> Any:
        """Close stage ``name``: its compute is its tasks' (``states``), and the first's
        result is returned."""
        now = time.perf_counter()
        stages[name], clock[0] = now - clock[0], now
        results = [state.result() for state in states]
        compute[name] = sum(0.0 if state.name == "Cached" else float(result.compute_s)
                            for state, result in zip(states, results, strict=True))
        return results[0] if results else None

    parent = data_tasks.open_parent(rec, repo or ".")
    try:
        data = data_flow.with_options(task_runner=task_runner(rec.data))(
            recipe, overrides or [], repo, parent)
        lap("data")
        compute["data"] = sum(v for k, v in data["seconds"].items() if k != "version")
        dataset = str(Path(data["manifest"]).parent)
        # a cache hit must not stand in for a trained VAE folder that was deleted
        stale = rec.vae.source == "train" and not vae_dir(rec, data["dvc_hash"]).is_dir()
        vae = lap("vae", vae_stage.with_options(refresh_cache=stale)(
            rec, dataset, data["dvc_hash"], parent, return_state=True))
        trained = lap("pretrain", pretrain(rec, dataset, vae.dir, data["dvc_hash"], parent,
                                           return_state=True))
        # a cache hit must not stand in for a prompt set deleted or overwritten since
        prompts_state = rl_prompts_task.with_options(
            refresh_cache=not outputs_current(rec, repo or "."))(rec, repo or ".", parent,
                                                                  return_state=True)
        prompts = prompts_state.result()
        tuned = lap("rl", rl(rec, trained.model_dir, prompts, data["dvc_hash"],
                             trained.run_id, parent, return_state=True))
        if prompts_state.name != "Cached":
            compute["rl"] += prompts.compute_s
        # as for the VAE: a cache hit must not stand in for a deleted reasoner folder
        gone = rec.reasoner.backend == "train" and not reasoner_dir(rec).is_dir()
        rewriter = lap("reasoner", reasoner_stage.with_options(refresh_cache=gone)(
            rec, parent, return_state=True))
        searched = lap("search", search_task(
            rec, tuned.model_dir, rewriter, data["dvc_hash"], parent, return_state=True))
        turbo = lap("distill", distill(rec, tuned.model_dir, dataset, data["dvc_hash"],
                                       tuned.run_id, parent, return_state=True))
        scored = lap("evaluate", evaluate_stage(rec, tuned.model_dir, data["dvc_hash"], parent,
                                                trained.model_dir, turbo.model_dir,
                                                return_state=True))
        runs = {"data": data["mlflow_run_id"], "vae": vae.run_id, "pretrain": trained.run_id,
                "rl_prompts": prompts.run_id, "rl": tuned.run_id, "reasoner": rewriter.run_id,
                "search": searched.run_id, "distill": turbo.run_id, "evaluate": scored.run_id}
        runs = {stage: run_id for stage, run_id in runs.items() if run_id}  # a pretrained VAE
        registered = register(
            rec, tuned.model_dir, data["dvc_hash"], scored.card(), runs, parent,
            {"lens.rl_prompts_dvc_hash": prompts.dvc_hash,
             "lens.pretrain_model_dir": trained.model_dir},
            rewriter.dir, searched, return_state=True)
        turbo_recipe, turbo_card, turbo_tags = turbo_entry(rec, scored, registered.result())
        registered_turbo = register(
            turbo_recipe, turbo.model_dir, data["dvc_hash"], turbo_card, runs, parent,
            turbo_tags | {"lens.teacher_model_dir": tuned.model_dir}, return_state=True)
        version = lap("register", registered, registered_turbo)
        turbo_version = registered_turbo.result()
        runs = runs | {"register": version.run_id}  # the task keeps the dict it was given
        reason = f"pipeline run of recipe {rec.name}"
        promotion = release_tasks.promote_task(version.name, version.version, reason=reason)
        turbo_promotion = release_tasks.promote_task(turbo_version.name, turbo_version.version,
                                                     reason=reason)
        lap("promote")
        compute["promote"] = 0.0
    except BaseException as error:
        data_tasks.close_parent(parent, {}, "FAILED")
        if isinstance(error, Exception):  # not on Ctrl-C: that stops at once
            failed = next((s for s in STAGES if s not in stages), "report")
            first = (str(error).strip().splitlines() or [""])[0]
            with suppress(Exception):  # the report must not hide the error it reports
                failure_report(rec.name, parent, dict(stages), failed,
                               f"{type(error).__name__}: {first}")
        raise
    summary = {"dvc_hash": data["dvc_hash"], "vae_dir": vae.dir,
               "model_dir": tuned.model_dir, "pretrain_run_id": trained.run_id,
               "pretrained_dir": trained.model_dir, "rl_run_id": tuned.run_id,
               "rl_prompts_dvc_hash": prompts.dvc_hash,
               "rl_prompts_path": prompts.path, "reasoner_dir": rewriter.dir,
               "system_prompt_hash": searched.hash,
               "model": version.name, "version": version.version,
               "turbo_dir": turbo.model_dir, "turbo_model": turbo_version.name,
               "turbo_version": turbo_version.version,
               **{f"run.{stage}": run_id for stage, run_id in runs.items()}}
    data_tasks.close_parent(parent, summary, metrics={
        **{f"stage_seconds/{k}": v for k, v in stages.items()},
        **{f"stage_compute_s/{k}": v for k, v in compute.items()}}, scores_run=scored.run_id)
    result = {**data, **summary, "parent_run_id": parent, "pretrain_job": trained.job,
              "run_dir": trained.run_dir, "scores": scored.scores,
              "baseline_scores": scored.baseline_scores, "eval_grid": scored.grid,
              "pretrained_scores": scored.pretrained_scores, "rl": tuned.rl_summary(),
              "reasoner": {"heldout": rewriter.heldout, "test": searched.test,
                           "curve": searched.curve, "system_prompt": searched.system_prompt,
                           "hash": searched.hash},
              "seconds_per_image": scored.seconds_per_image,
              "eval_hash": scored.eval_hash, "promotion": promotion,
              "turbo": {**asdict(scored.turbo), "job": turbo.job,  # turbo_entry checked it
                        "run_id": turbo.run_id, "model": turbo_version.name,
                        "version": turbo_version.version, "promotion": turbo_promotion},
              "stages": stages,
              "compute": compute}
    pipeline_report(rec.name, result, runs)
    return result


def run(recipe: str, overrides: list[str] | None = None, repo: str | None = None) -> dict[str, Any]:
    rec = load_recipe(recipe, overrides)
    with shared_api(rec.data), tags(f"recipe:{rec.name}", f"recipe-hash:{rec.hash()}"):
        return pipeline_flow(recipe, overrides or [], repo)
