"""The registry stage: one MLflow model version per pipeline run, aliased ``candidate``.

The version is a pyfunc (``tasks/lens_pyfunc.py``) wrapping the saved LensPipeline. It carries
lineage tags (data DVC hash, git commit, recipe hash, Prefect flow-run id, stage run ids, eval
config hash), the eval scores and latency as tags (so the registry view shows them), the
recipe's promotion gates, and a markdown model card (artifact and version description).
"""

from __future__ import annotations

import tempfile
import time
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from prefect import get_run_logger, task

import mlflow
from lens_model.pipeline import load_pipeline
from lens_model.reasoner.attached import attach
from lens_model.recipe import Recipe
from lens_model.secrets import redact
from tasks import tracking
from tasks.cache import keyed_by, trained_model
from tasks.results import Evaluation, Registered, ScoreCard, SearchedPrompt

PYFUNC = Path(__file__).with_name("lens_pyfunc.py")
CANDIDATE, CHAMPION = "candidate", "champion"
MODEL_URI_SCHEMES = ("models:/", "runs:/")
# What loading the pyfunc imports, pinned to what logged it. Given, not inferred: MLflow's
# inference loads the model in a subprocess, most of the register stage's time (its cost on
# the tiny recipe: docs/architecture.md, "register").
RUNTIME = ("lens-platform", "mlflow", "torch", "diffusers", "transformers", "safetensors",
           "pandas", "numpy", "pillow")


def requirements() -> list[str]:
    """The pyfunc's pip requirements: the runtime packages at their installed versions, less
    any local label (torch's "+cpu"), so a GPU host installs its own build."""
    return [f"{name}=={installed_version(name).split('+')[0]}" for name in RUNTIME]


def signature(recipe: Recipe) -> ModelSignature:
    """Prompts in, PNG bytes out; sampling settings as params defaulting to the eval's."""
    e = recipe.eval
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "rewrite"),
                        ColSpec("binary", "image")]),
        params=ParamSchema([ParamSpec("steps", "long", e.steps), ParamSpec("cfg", "double", e.cfg),
                            ParamSpec("size", "string", e.size), ParamSpec("seed", "long", 0),
                            ParamSpec("reasoner", "boolean", True)]))


def _reasoner_card(searched: SearchedPrompt | None) -> str:
    """The card's reasoner section: the system prompt and shapes-GenEval-R with and without."""
    if not searched:
        return ""
    test = searched.test
    conditions = [c for c in ("r/none", "r/seed", "r/searched") if c in test]
    rows = "\n".join(f"| {k} | " + " | ".join(f"{test[c].get(k, float('nan')):.3f}"
                                               for c in conditions) + " |"
                     for k in test[conditions[-1]])
    prompt = "\n".join(f"    {line}" for line in searched.system_prompt.splitlines())
    return f"""
## Reasoner
Prompts are rewritten by the reasoner saved with this model, under the system prompt
`{searched.hash}` found by the search ({searched.rounds} rounds, stopped by
{searched.stopped}):

{prompt}

Shapes-GenEval-R (protocol `{searched.r_eval_hash}`, the held-out test split):

| category | {' | '.join(c.split('/')[1] for c in conditions)} |
|---|{'---|' * len(conditions)}
{rows}
"""


def model_card(recipe: Recipe, tags: dict[str, str], card: ScoreCard,
               searched: SearchedPrompt | None = None) -> str:
    """A markdown card: what the model is, how it was made, how it scores."""
    scores, columns, teacher = card.scores, card.columns, card.teacher
    rows = "\n".join(f"| {k} | {v:.3f} | " + " | ".join(f"{c.get(k, float('nan')):.3f}"
                                                     for c in columns.values()) + " |"
                     for k, v in scores.items())
    header = "| category | score | " + " | ".join(columns) + " |\n|---|---|" + "---|" * len(columns)
    lineage = "\n".join(f"- `{k}`: {v}" for k, v in sorted(tags.items()))
    e = recipe.eval
    stages = ("rectified flow, then DiffusionNFT RL with rubric rewards on a LoRA adapter "
              "(merged into the weights)" if card.rl_trained or teacher else "rectified flow")
    if teacher:
        stages += (f", then distilled from `{teacher}` into a {e.steps}-step, CFG-free student "
                   "(Decoupled-DMD with a GAN branch: Lens-Turbo)")
    return f"""# {recipe.tracking.model_name}: Lens `{recipe.name}` recipe

A Lens MMDiT ({recipe.model.preset} preset) trained with {stages} on the
`{recipe.data.source}` data, with the {recipe.text_encoder.path} text encoder (layers
{recipe.text_encoder.layers}) and a semantic VAE ({recipe.vae.source}).

## Shapes-GenEval
Protocol `{card.eval_hash}`: {e.prompts_per_category} prompts per category (seed
{e.prompt_seed}), {e.size}, {e.steps} {e.sampler} steps, CFG {e.cfg}, seed {e.seed}.

{header}
{rows}

Latency: {card.seconds_per_image:.3f} s per image at these settings.
{_reasoner_card(searched)}
## Lineage
{lineage}

## Use
```python
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/{recipe.tracking.model_name}@candidate")
out = model.predict(pd.DataFrame({{"prompt": ["a photo of a red circle"]}}),
                    params={{"steps": {e.steps}, "cfg": {e.cfg}, "size": "{e.size}", "seed": 0}})
```
"""


def turbo_entry(recipe: Recipe, evaluation: Evaluation, teacher: Registered
                ) -> tuple[Recipe, ScoreCard, dict[str, str]]:
    """What :func:`register` takes for the distilled model beside its ``teacher`` (the
    teacher's registered version): the recipe as ``<model_name>-turbo`` with the turbo eval
    protocol (so the pyfunc's params default to the student's steps and no CFG), its scores
    beside the teacher's, and lineage tags naming the teacher (the promotion gate reads its
    overall score)."""
    turbo = evaluation.turbo
    if turbo is None:
        raise ValueError(f"recipe {recipe.name}: the evaluation scored no distilled model; "
                         "pass the distill stage's final/ folder as evaluate_stage's turbo_dir")
    turbo_recipe = recipe.model_copy(update={
        "tracking": recipe.tracking.model_copy(
            update={"model_name": f"{recipe.tracking.model_name}-turbo"}),
        "eval": recipe.eval.model_copy(update={"steps": turbo.steps, "cfg": 1.0})})
    name = f"{teacher.name}/{teacher.version}"
    card = ScoreCard(turbo.scores, turbo.seconds_per_image, turbo.eval_hash, {
        f"teacher ({recipe.eval.steps} steps, CFG {recipe.eval.cfg})": evaluation.scores,
        f"teacher ({turbo.steps} steps, no CFG)": turbo.undistilled_scores}, teacher=name)
    tags = {"lens.teacher": name, "lens.teacher_overall": f"{evaluation.scores['overall']:.4f}",
            "lens.teacher_eval_hash": evaluation.eval_hash, "lens.speedup": f"{turbo.speedup:.2f}"}
    return turbo_recipe, card, tags


def _register_inputs(params: dict[str, Any]) -> dict[str, Any]:
    """One version per trained model and evaluation: a rerun with nothing changed finds it."""
    searched = params.get("searched")
    return {**trained_model(params["model_dir"]), "eval": params["card"].eval_hash,
            "name": params["recipe"].tracking.model_name, "gates": params["recipe"].gates,
            "reasoner": [params.get("reasoner_dir"), searched.hash if searched else None],
            "extra_tags": params.get("extra_tags")}  # a turbo model's teacher version


@task(name="register", persist_result=True,
      cache_policy=keyed_by(_register_inputs, ("tasks/registry.py", "tasks/lens_pyfunc.py",
                                                "lens_model/reasoner/attached.py")))
def register(recipe: Recipe, model_dir: str, dvc_hash: str, card: ScoreCard,
             stage_runs: dict[str, str], parent_run_id: str = "",
             extra_tags: dict[str, str] | None = None, reasoner_dir: str = "",
             searched: SearchedPrompt | None = None) -> Registered:
    """Log the pipeline as a pyfunc, register a new version and alias it ``candidate``;
    ``extra_tags`` join its lineage tags (the RL prompt set's DVC hash, say). With
    ``searched``, the reasoner at ``reasoner_dir`` is saved with the pipeline, the searched
    system prompt as an artifact and its hash as the ``system_prompt_hash`` tag."""
    logger = get_run_logger()
    name = recipe.tracking.model_name
    exp = tracking.experiment(recipe.tracking.experiment)
    lineage = tracking.lineage(recipe, dvc_hash, parent_run_id)
    version_tags = {k: v for k, v in lineage.items() if not k.startswith("mlflow.")} | {
        f"lens.run.{stage}": run for stage, run in stage_runs.items()} | {
        "lens.eval_hash": card.eval_hash,
        "lens.gates": recipe.gates.model_dump_json()} | {
        f"eval.{k}": f"{v:.4f}" for k, v in card.scores.items()} | {
        "eval.seconds_per_image": f"{card.seconds_per_image:.4f}"} | (extra_tags or {})
    if searched:
        version_tags |= {"system_prompt_hash": searched.hash,
                         "lens.reasoner_backend": recipe.reasoner.backend,
                         "lens.r_eval_hash": searched.r_eval_hash} | {
            f"eval_r.{cond.split('/')[1]}.overall": f"{s['overall']:.4f}"
            for cond, s in searched.test.items() if cond.startswith("r/")}
    description = model_card(recipe, version_tags, card, searched)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_dir = Path(tmp) / "pipeline"
        started = time.perf_counter()
        load_pipeline(model_dir).save_pretrained(str(pipeline_dir))
        if searched:
            attach(pipeline_dir, recipe.reasoner, reasoner_dir, searched.system_prompt)
        compute_s = time.perf_counter() - started
        with mlflow.start_run(experiment_id=exp, run_name=f"register-{recipe.name}",
                              tags=lineage | {"lens.stage": "register"}) as run:
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC), artifacts={"pipeline": str(pipeline_dir)},
                signature=signature(recipe), pip_requirements=requirements(),
                registered_model_name=name)
            mlflow.log_text(description, "model_card.md")
            mlflow.log_dict(card.scores, "eval_scores.json")
            if searched:
                mlflow.log_text(searched.system_prompt, "system_prompt.txt")
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.update_model_version(name, version, description=description)
    client.set_registered_model_alias(name, CANDIDATE, version)
    logger.info(f"registered {name} version {version} as @{CANDIDATE}")
    return Registered(name, version, run.info.run_id, f"models:/{name}/{version}", card.scores,
                      {k: str(v) for k, v in version_tags.items()}, compute_s)


def local_model(model: str) -> str:
    """A local model folder: ``model`` itself, or an MLflow model URI downloaded.

    A registered Lens model is an MLflow model with the saved LensPipeline as its artifact
    ``pipeline``: pyfunc's layout, ``<model>/artifacts/pipeline``.
    """
    if not model.startswith(MODEL_URI_SCHEMES):
        return model
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
    except mlflow.exceptions.MlflowException as exc:
        raise ValueError(f"--model {model!r} could not be resolved in MLflow "
                         f"({redact(mlflow.get_tracking_uri())}): {exc.message}; check the "
                         "model name and its alias or version (models:/NAME@ALIAS or "
                         "models:/NAME/VERSION)"
                         ) from None
    for folder in (local / "artifacts" / "pipeline", local):
        if (folder / "model_index.json").is_file():
            return str(folder)
    raise FileNotFoundError(f"--model {model!r} holds no saved LensPipeline (looked for "
                            f"artifacts/pipeline/model_index.json in {local}); log the pipeline "
                            "folder as the model's artifact 'pipeline'")
