"""The pretraining stage: launch the DeepSpeed trainer, stream its progress to MLflow.

The job name is deterministic (recipe hash + data hash), and so is its run directory under
``$LENS_HOME/runs/``: a retried task finds the last checkpoint there and resumes, instead of
starting over.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

import mlflow
from lens_model import atomic, defaults
from lens_model.recipe import Recipe, load_recipe
from lens_model.train.launch import torchrun_cmd
from tasks import tracking
from tasks.event_stream import run_streaming
from tasks.results import TrainedJob

PROGRAM = Path(importlib.util.find_spec("lens_model.train.pretrain").origin)  # no import


def job_name(recipe: Recipe, dvc_hash: str) -> str:
    return f"pretrain-{recipe.name}-{recipe.train_hash()}-{dvc_hash[:8]}"


def from_model_job_name(stage: str, recipe: Recipe, section_hash: str, data_hash: str,
                        model_dir: str) -> str:
    """A stage that starts from a trained model (rl, distill): deterministic in its recipe
    section, its data and that model's folder, so a retry resumes the same job."""
    model = hashlib.sha256(model_dir.encode()).hexdigest()[:8]
    return f"{stage}-{recipe.name}-{section_hash}-{data_hash[:8]}-{model}"


def command(recipe: Recipe, args: list[str], program: Path = PROGRAM) -> list[str]:
    """One process runs ``program`` directly; more on this node go through torchrun."""
    launch = recipe.launch
    if launch.nnodes > 1:
        raise ValueError(f"launch.nnodes={launch.nnodes}: a local task runs one node; render a "
                         f"cluster job with `lens train render {recipe.name} --target k8s|slurm`")
    if launch.nproc_per_node == 1:
        return [sys.executable, str(program), *args]
    return torchrun_cmd(nproc_per_node=launch.nproc_per_node, nnodes=1, node_rank=0,
                        master_addr=launch.master_addr, master_port=launch.master_port,
                        script=program, args=args)


def launch_env(recipe: Recipe) -> dict[str, str]:
    """DeepSpeed's accelerator is the recipe's device, whatever the shell's default says."""
    return {"DS_ACCELERATOR": recipe.launch.device}


def _finished(run_dir: Path, steps: int) -> dict[str, Any] | None:
    """The trainer's final event, if the run's last event says it finished all ``steps``."""
    events = run_dir / "events.jsonl"
    if not events.is_file():
        return None
    lines = events.read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    final = last.get("final", {})
    done = final.get("steps") == steps and Path(final.get("model_dir", "")).is_dir()
    return final if done else None


def gpu_tags(recipe: Recipe) -> set[str]:
    """The task's concurrency tag: the GPU type (``h100``) it runs on, none on CPU. Prefect's
    tag limit of that name (``prefect concurrency-limit create h100 NODES``: one slot per
    node, since the task runs one node) throttles pretraining; with no limit set it runs."""
    gpu = recipe.launch.gpu_type
    return {gpu.lower()} if recipe.launch.device == "cuda" and gpu != "none" else set()


def under_gpu_tag(stage: Any, recipe: Recipe, *args: Any, **kwargs: Any) -> Any:
    """Call the training task ``stage`` (same arguments and options) under its recipe's GPU
    tag."""
    tags = gpu_tags(recipe)
    return stage.with_options(tags=stage.tags | tags)(recipe, *args, **kwargs)


def pretrain(recipe: Recipe, dataset: str, vae: str, dvc_hash: str, parent_run_id: str = "",
             **options: Any) -> Any:
    """Call :func:`pretrain_task` under its recipe's GPU tag. With ``pretrain.init_from`` the
    named recipe's pretraining runs first (or is reused) and this one starts from its final
    weights: the paper's two stages, 512^2 then mixed resolutions."""
    init = ""
    if recipe.pretrain.init_from:
        first = pretrain(load_recipe(recipe.pretrain.init_from), dataset, vae, dvc_hash,
                         parent_run_id)
        init = first.model_dir
    return under_gpu_tag(pretrain_task, recipe, dataset, vae, dvc_hash, parent_run_id, init,
                         **options)


@task(name="pretrain", retries=1, retry_delay_seconds=5)
def pretrain_task(recipe: Recipe, dataset: str, vae: str, dvc_hash: str,
                  parent_run_id: str = "", init: str = "") -> TrainedJob:
    """Train, streaming losses, the compute ledger and sample grids into one MLflow run;
    from ``init`` (a final/ folder) when given."""
    # A second stage's job is also that of its starting weights.
    job = from_model_job_name("pretrain", recipe, recipe.train_hash(), dvc_hash, init) \
        if init else job_name(recipe, dvc_hash)
    run_dir = defaults.lens_home() / "runs" / job
    params = run_dir / "recipe.yaml"
    atomic.write_text(params, recipe.to_yaml())
    args = ["--params", str(params), "--dataset", dataset, "--vae", vae,
            "--run-dir", str(run_dir), *(["--init", init] if init else [])]
    tags = tracking.lineage(recipe, dvc_hash, parent_run_id) | {"lens.stage": "pretrain"}
    logged = {k: v for k, v in recipe.flat().items()
              if k.split(".")[0] in ("model", "text_encoder", "vae", "pretrain", "launch",
                                     "loader")}
    return tracked_job(recipe, job, run_dir, command(recipe, args), recipe.pretrain.steps,
                       tags, logged)


def tracked_job(recipe: Recipe, job: str, run_dir: Path, cmd: list[str], steps: int,
                tags: dict[str, str], params: dict[str, Any],
                on_final: Callable[[dict[str, Any]], None] | None = None) -> TrainedJob:
    """Run a training program (``cmd``) as the MLflow run tagged ``lens.job`` = ``job``,
    streaming its events (metrics, artifacts, checkpoints) there; a job that finished all
    ``steps`` before is reused, a stopped one resumes in its run. ``on_final(final)`` runs
    inside the MLflow run once the program is done, for stage-specific logging."""
    logger = get_run_logger()
    exp = tracking.experiment(recipe.tracking.experiment)
    existing = mlflow.search_runs([exp], filter_string=f"tags.`lens.job` = '{job}'",
                                  output_format="list", max_results=1)
    done = _finished(run_dir, steps)
    if done and existing:  # a rerun of a finished job: nothing to launch
        logger.info(f"{job} finished all {steps} steps before; reusing {done['model_dir']}")
        return TrainedJob(existing[0].info.run_id, job, str(run_dir), 0.0, done)
    final: dict[str, Any] = {}
    with mlflow.start_run(run_id=existing[0].info.run_id if existing else None,
                          experiment_id=exp, run_name=job, tags=tags | {"lens.job": job},
                          log_system_metrics=True) as run:
        if not existing:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

        def on_event(event: dict[str, Any]) -> None:
            step = int(event.get("step", 0))
            if "metrics" in event:
                mlflow.log_metrics(event["metrics"], step=step)
                loss = event["metrics"].get("train/loss")
                logger.info(f"{job} step {step}: loss {loss:.4f}" if loss is not None
                            else f"{job} step {step}")
            if "artifact" in event:
                mlflow.log_artifact(str(run_dir / event["artifact"]),
                                    artifact_path=str(Path(event["artifact"]).parent))
            if "checkpoint" in event:
                mlflow.set_tag("lens.last_checkpoint", str(run_dir / event["checkpoint"]))
            if "final" in event:
                final.update(event["final"])

        started = time.perf_counter()
        run_streaming(cmd, run_dir, on_event, logger.info, env=launch_env(recipe))
        compute_s = time.perf_counter() - started  # the trainer's lifetime; streaming overlaps
        mlflow.set_tags({"lens.model_dir": final.get("model_dir", "")})
        if on_final is not None:
            on_final(final)
        return TrainedJob(run.info.run_id, job, str(run_dir), compute_s, final)
