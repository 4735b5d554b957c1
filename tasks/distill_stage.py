"""The distill stage: launch the Lens-Turbo program on the RL model (the teacher), stream it to
MLflow.

As for pretraining and RL, the job name is deterministic (the recipe's distill hash, the data's
DVC hash and the teacher), so a retried task resumes in the same run directory and a finished
job is reused. The student reads the pretraining feature cache (``$LENS_HOME/features``): the
teacher's frozen encoders are the pretrained ones, so the features are the same. The MLflow run
holds the recipe's ``distill`` section, every loss term, the compute ledger, the turbo grids
(student on the fixed schedule under the teacher's CFG samples) and lineage tags naming the
teacher's run and folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from prefect import task

from lens_model import atomic, defaults
from lens_model.recipe import Recipe
from tasks import tracking
from tasks.pretrain_stage import command, from_model_job_name, tracked_job, under_gpu_tag
from tasks.results import TrainedJob

PROGRAM = Path(importlib.util.find_spec("lens_model.train.distill").origin)  # no import


def job_name(recipe: Recipe, dvc_hash: str, teacher_dir: str) -> str:
    return from_model_job_name("distill", recipe, recipe.distill_hash(), dvc_hash, teacher_dir)


def distill(recipe: Recipe, *args: Any, **kwargs: Any) -> Any:
    """Call :func:`distill_task` under its recipe's GPU tag."""
    return under_gpu_tag(distill_task, recipe, *args, **kwargs)


@task(name="distill", retries=1, retry_delay_seconds=5)
def distill_task(recipe: Recipe, teacher_dir: str, dataset: str, dvc_hash: str,
                 teacher_run_id: str, parent_run_id: str = "") -> TrainedJob:
    """Distil the teacher ``teacher_dir`` (the RL stage's final/) on ``dataset``; the result's
    ``final`` holds the student's folder and its schedule."""
    job = job_name(recipe, dvc_hash, teacher_dir)
    run_dir = defaults.lens_home() / "runs" / job
    params = run_dir / "recipe.yaml"
    atomic.write_text(params, recipe.to_yaml())
    args = ["--params", str(params), "--model", teacher_dir, "--dataset", dataset,
            "--features", str(defaults.lens_home() / "features"), "--run-dir", str(run_dir)]
    tags = tracking.lineage(recipe, dvc_hash, parent_run_id) | {
        "lens.stage": "distill", "lens.teacher_run": teacher_run_id,
        "lens.teacher_model_dir": teacher_dir}
    logged = {k: v for k, v in recipe.flat().items() if k.split(".")[0] == "distill"}
    return tracked_job(recipe, job, run_dir, command(recipe, args, PROGRAM), recipe.distill.steps,
                       tags, logged)
