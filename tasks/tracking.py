"""MLflow: experiments on the embedded defaults, lineage tags on every run, and no secrets.

Credentials come from the environment (or instance roles) and stay there: nothing here logs
``os.environ``. As a second line of defence every param and tag this module logs goes
through :func:`lens_model.secrets.redact_mapping` (secret-named keys, secret environment values
and URI passwords become ``***``).
"""

from __future__ import annotations

import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param

import mlflow
from lens_model import defaults
from lens_model.recipe import Recipe
from lens_model.secrets import redact_mapping


def git_commit(cwd: str | Path = ".") -> str:
    """The checkout's commit (``+dirty`` when it has changes), or ``unknown`` outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


def flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


def lineage(recipe: Recipe, dvc_hash: str, parent_run_id: str = "", cwd: str | Path = ".") -> dict:
    """The lineage tags every run carries (ARCHITECTURE.md, Conventions); a stage run with a
    parent is also nested under it in MLflow's UI."""
    tags = {
        "lens.git_commit": git_commit(cwd),
        "lens.recipe": recipe.name,
        "lens.recipe_hash": recipe.hash(),
        "lens.dvc_hash": dvc_hash,
        "lens.prefect_flow_run_id": flow_run_id(),
        "lens.parent_run_id": parent_run_id,
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return redact_mapping(tags)


def open_parent(recipe: Recipe, cwd: str | Path = ".") -> str:
    """The pipeline's parent run (its stage runs nest under it); left open until closed. It
    holds the whole recipe as params, so MLflow's compare view shows what two runs changed."""
    exp = experiment(recipe.tracking.experiment)
    client = mlflow.MlflowClient()
    run = client.create_run(exp, run_name=f"pipeline-{recipe.name}", tags=lineage(
        recipe, "", cwd=cwd) | {"lens.stage": "pipeline"})
    params = [Param(k, str(v)[:500]) for k, v in redact_mapping(recipe.flat()).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run.info.run_id, params=params[start:start + 100])
    return run.info.run_id


def close_parent(run_id: str, summary: dict[str, Any], status: str = "FINISHED",
                 metrics: dict[str, float] | None = None, scores_run: str = "") -> None:
    """Tag the summary, log ``metrics`` and the scores of the evaluation run ``scores_run``
    under their own names (the same in every pipeline run, so MLflow's compare view lines two
    pipeline runs up), and end the run."""
    client = mlflow.MlflowClient()
    for key, value in redact_mapping({f"lens.{k}": v for k, v in summary.items()}).items():
        client.set_tag(run_id, key, value)
    if scores_run:
        metrics = client.get_run(scores_run).data.metrics | (metrics or {})
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
    for start in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics a batch
        client.log_batch(run_id, metrics=batch[start:start + 1000])
    client.set_terminated(run_id, status)


def experiment(name: str) -> str:
    """The experiment's id, creating it (artifacts under ``$LENS_HOME`` on SQLite) if missing."""
    uri = defaults.mlflow_uri()
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = defaults.mlflow_artifact_root().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent run
        return mlflow.get_experiment_by_name(name).experiment_id


def log_data_run(recipe: Recipe, merged: dict[str, Any], version: dict[str, Any],
                 seconds: dict[str, float], dataset_dir: str | Path, cwd: str | Path = ".",
                 parent_run_id: str = "") -> str:
    """One MLflow run for a dataset build: params, counts, reasons, GX report, the dataset."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    exp = experiment(recipe.tracking.experiment)
    tags = lineage(recipe, version["dvc_hash"], parent_run_id, cwd=cwd) | {
        "lens.stage": "data", "lens.dvc_remote": version["remote"],
        "lens.raw_dvc_hash": version["raw_dvc_hash"], "lens.contract_passed":
        str(merged["passed"]).lower()}
    with mlflow.start_run(experiment_id=exp, run_name=f"data-{recipe.name}",
                          tags=redact_mapping(tags)) as run:
        params = {k: v for k, v in recipe.flat().items()
                  if k.split(".")[0] in ("name", "seed", "data", "buckets")}
        mlflow.log_params({k: v[:500] for k, v in redact_mapping(params).items()})
        mlflow.log_metrics({
            "data.inputs": merged["inputs"], "data.valid": merged["valid"],
            "data.quarantined": merged["quarantined"],
            "data.rejection_rate": merged["rejection_rate"],
            "data.caption_word_mean": merged["caption_word_mean"],
            "data.truncation_rate": merged["truncation_rate"],
            **{f"quarantine.{reason}": n for reason, n in merged["reasons"].items()},
            **{f"seconds.{stage}": s for stage, s in seconds.items()},
        })
        with warnings.catch_warnings():  # MLflow registers its local source twice and says so
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
            source = resolve_dataset_source(str(Path(dataset_dir).resolve()))
        dataset = MetaDataset(source=source, name=f"{recipe.name}-dataset",
                              digest=version["dvc_hash"][:36])
        mlflow.log_input(dataset, context="training", tags={"dvc_hash": version["dvc_hash"]})
        for key in ("report", "summary"):
            mlflow.log_artifact(merged[key], artifact_path="contract")
        return run.info.run_id
