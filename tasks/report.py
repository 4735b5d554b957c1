"""The pipeline run's summary as a Prefect markdown artifact, linking its MLflow runs."""

from __future__ import annotations

import os
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

import mlflow


def number(value: float | None) -> str:
    """A score to three places, or "-" where there is none."""
    return "-" if value is None else f"{value:.3f}"


def run_link(run_id: str) -> str:
    """A markdown link to the run in the MLflow UI (``LENS_MLFLOW_UI``, default
    ``lens ui``'s address)."""
    ui = os.environ.get("LENS_MLFLOW_UI", "http://127.0.0.1:5000").rstrip("/")
    exp = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    return f"[{run_id[:8]}]({ui}/#/experiments/{exp}/runs/{run_id})"


def publish(recipe: str, parent_run_id: str, markdown: str, description: str) -> str:
    """The report as the Prefect artifact and as the parent MLflow run's description, so a
    reviewer who opens either UI reads the same summary."""
    mlflow.MlflowClient().set_tag(parent_run_id, "mlflow.note.content", markdown)
    return str(create_markdown_artifact(key=f"lens-pipeline-{recipe}", markdown=markdown,
                                        description=description))


@task(name="pipeline-report")
def pipeline_report(recipe: str, result: dict[str, Any], runs: dict[str, str]) -> str:
    """Stage times and MLflow runs, scores beside the untrained model's, the version."""
    links = {stage: run_link(run_id) for stage, run_id in runs.items()}
    rows = "\n".join(f"| {stage} | {seconds:.1f} | {links.get(stage, '')} |"
                     for stage, seconds in result["stages"].items())
    before = result["pretrained_scores"]
    scores = "\n".join(f"| {k} | {v:.3f} | {before.get(k, 0.0):.3f} | "
                       f"{result['baseline_scores'].get(k, 0.0):.3f} |"
                       for k, v in result["scores"].items())
    promotion = result["promotion"]
    rl = result["rl"]
    reasoner = result["reasoner"]
    test = reasoner["test"]
    r_rows = "\n".join(f"| {k} | {test['r/none'].get(k, 0.0):.3f} | "
                        f"{test['r/seed'].get(k, 0.0):.3f} | {v:.3f} |"
                        for k, v in test["r/searched"].items())
    turbo = result["turbo"]
    t_rows = "\n".join(f"| {k} | {v:.3f} | {result['scores'].get(k, 0.0):.3f} | "
                        f"{turbo['undistilled_scores'].get(k, 0.0):.3f} |"
                        for k, v in turbo["scores"].items())
    t_promo = turbo["promotion"]
    few = f"{turbo['steps']} steps no CFG"
    hacking = ("\n\n**Reward hacking:** the RL run's gold score fell while its training reward "
               "rose; check its sample grids before promoting." if rl["reward_hacking"] else "")
    markdown = f"""# Lens pipeline: `{recipe}`

Parent MLflow run {run_link(result['parent_run_id'])}; model `{result['model']}` version
{result['version']} (aliases: {', '.join(promotion['aliases']) or 'none'};
{'promoted' if promotion['promoted'] else 'not promoted: ' + promotion.get('reason', '')}).

RL: training reward {number(rl['reward_start'])} -> {number(rl['reward_end'])}, gold set
{number(rl['gold_before'])} -> {number(rl['gold_after'])}.{hacking}

| stage | seconds | MLflow run |
|---|---|---|
{rows}

| shapes-GenEval (`{result['eval_hash']}`) | score | before RL | untrained |
|---|---|---|---|
{scores}

Turbo: `{turbo['model']}` version {turbo['version']}, {turbo['steps']} steps without CFG,
{turbo['seconds_per_image']:.3f} s/image ({turbo['speedup']:.1f}x faster than the teacher;
{'promoted' if t_promo['promoted'] else 'not promoted: ' + t_promo.get('reason', '')}).

| shapes-GenEval (turbo `{turbo['eval_hash']}`) | turbo | teacher | teacher, {few} |
|---|---|---|---|
{t_rows}

Reasoner: held-out rule following {number(reasoner['heldout'].get('exact'))}; searched system
prompt `{reasoner['hash']}` ({len(reasoner['curve']) - 1} rounds). Its test split:

| shapes-GenEval-R | no reasoner | seed prompt | searched prompt |
|---|---|---|---|
{r_rows}
"""
    return publish(recipe, result["parent_run_id"], markdown, f"pipeline run of recipe {recipe}")


@task(name="pipeline-failure-report")
def failure_report(recipe: str, parent_run_id: str, stages: dict[str, float], failed: str,
                   error: str) -> str:
    """What a failed run got done, where it stopped and why (``error``: the exception's type
    and first line): the same key as the summary, so its latest version says the last run
    failed."""
    rows = "\n".join(f"| {stage} | {seconds:.1f} | done |" for stage, seconds in stages.items())
    markdown = f"""# Lens pipeline: `{recipe}` FAILED at `{failed}`

Parent MLflow run {run_link(parent_run_id)} (status FAILED).

| stage | seconds | state |
|---|---|---|
{rows}
| {failed} | | **failed**: {error[:300]} |
"""
    return publish(recipe, parent_run_id, markdown, f"failed pipeline run of recipe {recipe}")
