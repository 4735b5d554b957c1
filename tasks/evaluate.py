"""The evaluation stage: shapes-GenEval of the trained model and of its untrained baseline.

Both are scored under the recipe's fixed protocol, whose hash is logged with every score. One
child MLflow run holds the per-category metrics (``eval/<category>``, ``baseline/<category>``),
the latency, the protocol, the report (JSON) and the image grid (prompt under each image,
green frame for pass, red for fail). It also logs the VAE's ceiling (``ceiling/<category>``):
the scores of the prompts' ground-truth renders after the VAE's round trip, the most a model
drawing in that latent space can reach under this protocol.

With a distilled (turbo) model, the same run scores it under the turbo protocol: the eval's
prompts, size and seeds at the student's own step count without CFG (``turbo/<category>``),
and, beside it, the teacher drawn the same way (``undistilled/<category>``): what the
distillation earned over simply sampling the teacher with few steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any

from prefect import get_run_logger, task

import mlflow
from lens_model import atomic, defaults
from lens_model.eval.geneval import (
    EvalProtocol,
    EvalReport,
    evaluate,
    pipeline_generator,
    reconstruction_ceiling,
    report_grid,
    untrained_like,
)
from lens_model.pipeline import load_pipeline
from lens_model.recipe import Recipe
from tasks import tracking
from tasks.cache import keyed_by, trained_model
from tasks.results import Evaluation, TurboScores

EVAL_CODE = ("lens_model/eval", "lens_model/pipeline.py", "lens_model/flow_matching.py",
             "lens_model/transformer.py", "tasks/evaluate.py")


def _metrics(prefix: str, report: EvalReport) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in report.scores.items()} | {
        f"{prefix}/seconds_per_image": report.seconds_per_image}


def turbo_protocol(protocol: EvalProtocol, steps: int) -> EvalProtocol:
    """``protocol`` at a distilled model's ``steps``, without CFG."""
    return dataclasses.replace(protocol, steps=steps, cfg=1.0)


def _eval_inputs(params: dict[str, Any]) -> dict[str, Any]:
    """What decides the scores: the protocol, the baseline's seed, the trained model and the
    pretrained and distilled models scored beside it."""
    return {"eval": params["recipe"].eval, "seed": params["recipe"].seed,
            **trained_model(params["model_dir"]),
            **{key: trained_model(params[key]) if params.get(key) else None
               for key in ("pretrained_dir", "turbo_dir")}}


@task(name="evaluate", persist_result=True, cache_policy=keyed_by(_eval_inputs, EVAL_CODE))
def evaluate_stage(recipe: Recipe, model_dir: str, dvc_hash: str,
                   parent_run_id: str = "", pretrained_dir: str = "",
                   turbo_dir: str = "") -> Evaluation:
    """Score ``model_dir`` (a training final/ folder), the untrained baseline and, beside
    them, ``pretrained_dir`` (the model RL started from), all under the recipe's protocol;
    and ``turbo_dir`` (``model_dir`` distilled) beside ``model_dir`` under the turbo one."""
    logger = get_run_logger()
    protocol = EvalProtocol.from_recipe(recipe.eval)
    start = time.perf_counter()
    pipe = load_pipeline(model_dir)
    report = evaluate(pipeline_generator(pipe, protocol), protocol)
    baseline = evaluate(pipeline_generator(untrained_like(pipe, recipe.seed), protocol), protocol)
    pretrained = None
    if pretrained_dir:
        pretrained = evaluate(pipeline_generator(load_pipeline(pretrained_dir), protocol),
                              protocol)
    turbo: TurboScores | None = None
    if turbo_dir:
        student = load_pipeline(turbo_dir)
        if student.turbo_steps is None:
            raise ValueError(f"turbo_dir {turbo_dir} is not a distilled model (its lens.json "
                             "has no turbo section); pass the distill stage's final/ folder")
        fast = turbo_protocol(protocol, student.turbo_steps)
        scored = evaluate(pipeline_generator(student, fast), fast)
        undistilled = evaluate(pipeline_generator(pipe, fast), fast)
        turbo = TurboScores(turbo_dir, scored.scores, scored.seconds_per_image, fast.hash(),
                            fast.steps, undistilled.scores,
                            report.seconds_per_image / max(scored.seconds_per_image, 1e-9))
    ceiling = reconstruction_ceiling(pipe.semantic_vae.reconstruct, protocol,
                                     recipe.data.backgrounds, recipe.data.patterns)
    compute_s = time.perf_counter() - start
    key = hashlib.sha256(model_dir.encode()).hexdigest()[:8]
    out_dir = defaults.lens_home() / "eval" / f"{protocol.hash()}-{key}"
    grid = out_dir / "grid.png"
    atomic.write_with(grid, lambda tmp: report_grid(report).save(tmp, format="PNG"))
    atomic.write_json(out_dir / "report.json", report.to_json())
    if turbo:
        atomic.write_json(out_dir / "turbo_report.json", scored.to_json())
    exp = tracking.experiment(recipe.tracking.experiment)
    tags = tracking.lineage(recipe, dvc_hash, parent_run_id) | {
        "lens.stage": "evaluate", "lens.eval_hash": protocol.hash(), "lens.model_dir": model_dir}
    if turbo:
        tags |= {"lens.turbo_eval_hash": turbo.eval_hash, "lens.turbo_model_dir": turbo_dir}
    with mlflow.start_run(experiment_id=exp, run_name=f"evaluate-{recipe.name}",
                          tags=tags) as run:
        mlflow.log_params({f"eval.{k}": v for k, v in report.to_json()["protocol"].items()})
        mlflow.log_metrics(_metrics("eval", report) | _metrics("baseline", baseline)
                           | (_metrics("pretrained", pretrained) if pretrained else {})
                           | (_metrics("turbo", scored) | _metrics("undistilled", undistilled)
                              | {"turbo/speedup": turbo.speedup} if turbo else {})
                           | {f"ceiling/{k}": v for k, v in ceiling.items()})
        mlflow.log_artifact(str(grid), "eval")
        mlflow.log_artifact(str(out_dir / "report.json"), "eval")
        if turbo:
            mlflow.log_artifact(str(out_dir / "turbo_report.json"), "eval")
    logger.info(f"eval {protocol.hash()}: {report.scores} (untrained {baseline.scores}, VAE "
                f"ceiling {ceiling}), {report.seconds_per_image:.3f} s/image, grid {grid}")
    if turbo:
        logger.info(f"turbo eval {turbo.eval_hash}: {turbo.scores} (the teacher at "
                    f"{turbo.steps} steps without CFG: {turbo.undistilled_scores}), "
                    f"{turbo.seconds_per_image:.3f} s/image, {turbo.speedup:.1f}x faster")
    return Evaluation(run.info.run_id, report.scores, baseline.scores, ceiling,
                      pretrained.scores if pretrained else None, report.seconds_per_image,
                      protocol.hash(), str(grid), turbo, compute_s)
