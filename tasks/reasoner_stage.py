"""The reasoner stage: the prompt-rewriting LM the system-prompt search tunes for.

Backend ``train`` trains the small causal LM on the world's rules (cached: the same reasoner
section and seed reuse the folder) and logs one MLflow run: the section's params, the loss and
learning-rate curves, and the held-out rule-following rates (``heldout/rule/<name>`` and
``heldout/exact``: exact-match rewrites on rule sets and request contents never trained on).
Backend ``hf`` scores a given Hugging Face model the same way, untrained; ``openai`` has
nothing to train or load here, and the search calls its endpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger, task

import mlflow
from lens_model import defaults
from lens_model.reasoner.base import Reasoner
from lens_model.reasoner.endpoint import OpenAIReasoner
from lens_model.reasoner.lm import HFReasoner
from lens_model.reasoner.rules import RULES
from lens_model.reasoner.training import heldout_set, rule_following, train_reasoner
from lens_model.recipe import ReasonerSection, Recipe
from tasks import tracking
from tasks.cache import keyed_by
from tasks.results import ReasonerModel

# The files training reads: the search, its scoring and the release wrapper stay out, so
# changing them does not retrain the reasoner.
REASONER_CODE = tuple(f"lens_model/reasoner/{m}.py" for m in (
    "base", "endpoint", "lm", "grammar", "rules", "training")) + ("tasks/reasoner_stage.py",)


def _trained_by(recipe: Recipe) -> dict[str, Any]:
    """What decides the trained reasoner: its section less the search, and the seed."""
    return {"reasoner": recipe.reasoner.model_dump(mode="json", exclude={"search"}),
            "seed": recipe.seed}


def reasoner_dir(recipe: Recipe) -> Path:
    """Where this recipe's trained reasoner lives (the pipeline checks that it exists)."""
    blob = json.dumps(_trained_by(recipe), sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:8]
    return defaults.lens_home() / "reasoner" / f"{recipe.name}-{key}"


def load_reasoner(section: ReasonerSection, folder: str = "") -> Reasoner:
    """The recipe's reasoner: the trained or given Hugging Face model, or the endpoint."""
    if section.backend == "openai":
        return OpenAIReasoner(section.endpoint, section.max_system_chars)
    path = folder or section.path
    if not path:
        raise ValueError("reasoner.backend=hf needs reasoner.path: the folder of a Hugging "
                         "Face causal LM with a chat template")
    return HFReasoner(path, max_new_tokens=section.max_new_tokens,
                      batch_size=section.batch_size, max_system_chars=section.max_system_chars)


@task(name="reasoner", persist_result=True,
      cache_policy=keyed_by(lambda p: _trained_by(p["recipe"]), REASONER_CODE))
def reasoner_stage(recipe: Recipe, parent_run_id: str = "") -> ReasonerModel:
    """The reasoner's folder ("" for an endpoint), its held-out rule-following rates, its
    MLflow run and ``compute_s``."""
    section = recipe.reasoner
    if section.backend == "openai":
        load_reasoner(section)  # a missing URL or model fails here, not mid-search
        return ReasonerModel("")
    logger = get_run_logger()
    exp = tracking.experiment(recipe.tracking.experiment)
    tags = tracking.lineage(recipe, "", parent_run_id) | {"lens.stage": "reasoner",
                                                          "lens.reasoner_backend": section.backend}
    start = time.perf_counter()
    with mlflow.start_run(experiment_id=exp, run_name=f"reasoner-{recipe.name}",
                          tags=tags) as run:
        mlflow.log_params({k: v for k, v in recipe.flat().items()
                           if k.startswith("reasoner.") and not k.startswith("reasoner.search")})
        folder = section.path or ""
        if section.backend == "train":
            folder = str(reasoner_dir(recipe))

            def log(step: int, loss: float, lr: float) -> None:
                mlflow.log_metrics({"reasoner/loss": loss, "reasoner/lr": lr}, step=step)

            with torch.random.fork_rng():
                torch.manual_seed(recipe.seed)
                train_reasoner(section, recipe.seed, Path(folder), log)
        per_rule = max(1, section.heldout_examples // len(RULES))
        heldout = rule_following(load_reasoner(section, folder), heldout_set(per_rule, 0))
        mlflow.log_metrics({f"heldout/{k}": v for k, v in heldout.items()})
        if section.backend == "train":
            mlflow.log_artifacts(folder, "reasoner")
    compute_s = time.perf_counter() - start
    logger.info(f"reasoner ({section.backend}) {folder or section.endpoint.base_url}: held-out "
                f"exact {heldout['exact']:.3f}, per rule "
                f"{ {k[5:]: round(v, 2) for k, v in heldout.items() if k.startswith('rule/')} }")
    return ReasonerModel(folder, heldout, run.info.run_id, compute_s)
