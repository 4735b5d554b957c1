"""The RL stage: launch the DiffusionNFT program on the pretrained model, stream it to MLflow.

Like pretraining, the job name is deterministic (the recipe's RL hash, the prompt set's DVC
hash and the pretrained model), so a retried task resumes in the same run directory and a
finished job is reused. The MLflow run holds the recipe's ``rl`` section, the reward curves
(mean, per rubric kind, gold, diversity), the gold set's sample grids before and after, the
compute ledger, the adapter as an artifact and lineage tags naming the pretrain run and the
prompt set.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

import mlflow
from lens_model import atomic, defaults
from lens_model.recipe import Recipe
from tasks import tracking
from tasks.pretrain_stage import command, from_model_job_name, tracked_job, under_gpu_tag
from tasks.results import PromptSet, TrainedJob

PROGRAM = Path(importlib.util.find_spec("lens_model.train.rl").origin)  # no import


def job_name(recipe: Recipe, prompts_hash: str, model_dir: str) -> str:
    return from_model_job_name("rl", recipe, recipe.rl_hash(), prompts_hash, model_dir)


def rl(recipe: Recipe, *args: Any, **kwargs: Any) -> Any:
    """Call :func:`rl_task` under its recipe's GPU tag."""
    return under_gpu_tag(rl_task, recipe, *args, **kwargs)


@task(name="rl", retries=1, retry_delay_seconds=5)
def rl_task(recipe: Recipe, model_dir: str, prompts: PromptSet, dvc_hash: str,
            pretrain_run_id: str, parent_run_id: str = "") -> TrainedJob:
    """RL-train the pretrained ``model_dir`` on the prompt set ``prompts``; the result's
    ``final`` holds the merged model's folder, the adapter and the gold-score log."""
    logger = get_run_logger()
    job = job_name(recipe, prompts.dvc_hash, model_dir)
    run_dir = defaults.lens_home() / "runs" / job
    params = run_dir / "recipe.yaml"
    atomic.write_text(params, recipe.to_yaml())
    args = ["--params", str(params), "--model", model_dir, "--prompts", prompts.path,
            "--run-dir", str(run_dir)]
    tags = tracking.lineage(recipe, dvc_hash, parent_run_id) | {
        "lens.stage": "rl", "lens.pretrain_run": pretrain_run_id,
        "lens.pretrain_model_dir": model_dir, "lens.rl_prompts_dvc_hash": prompts.dvc_hash}

    def on_final(final: dict[str, Any]) -> None:
        from tasks.rl_prompts import log_prompt_input

        log_prompt_input(prompts.path, prompts.dvc_hash, f"{recipe.name}-rl-prompts")
        if final.get("adapter_dir"):
            mlflow.log_artifacts(final["adapter_dir"], "adapter")
        flagged = bool(final.get("reward_hacking"))
        mlflow.set_tag("lens.reward_hacking", str(flagged).lower())
        if flagged:
            logger.warning(f"{job}: reward hacking: the training reward rose while the gold "
                           f"score fell ({final.get('gold')})")

    logged = {k: v for k, v in recipe.flat().items() if k.split(".")[0] == "rl"}
    return tracked_job(recipe, job, run_dir, command(recipe, args, PROGRAM), recipe.rl.steps,
                       tags, logged, on_final)
