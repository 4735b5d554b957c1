"""The reasoner's system-prompt search for one model, outside the pipeline.

    lens search tiny --model models:/lens-tiny@champion [--set reasoner.search.max_rounds=8]

The model is a saved pipeline folder, a training run's final/ folder or a registered
version. Its own reasoner is searched for when the version carries one; otherwise the
recipe's reasoner stage provides it (cached, or trained). The pipeline runs the same task
between ``rl`` and ``evaluate``, and registers the winner with the model.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow

from flows.data import shared_api
from lens_model.reasoner.attached import MODEL
from lens_model.recipe import load_recipe
from tasks.prompt_search import search_task
from tasks.reasoner_stage import reasoner_stage
from tasks.registry import local_model
from tasks.results import ReasonerModel


@flow(name="lens-reasoner-search", version="1", log_prints=True)
def search_flow(recipe: str, model: str, overrides: list[str] | None = None) -> dict[str, Any]:
    rec = load_recipe(recipe, overrides)
    folder = local_model(model)
    own = Path(folder) / MODEL
    if rec.reasoner.backend != "openai" and (own / "config.json").is_file():
        reasoner = ReasonerModel(str(own))  # the version's reasoner, as released
    else:
        reasoner = reasoner_stage(rec)
    return asdict(search_task(rec, folder, reasoner)) | {"model": model,
                                                          "reasoner_dir": reasoner.dir}


def run(recipe: str, model: str, overrides: list[str] | None = None) -> dict[str, Any]:
    with shared_api(load_recipe(recipe, overrides).data):
        return search_flow(recipe, model, overrides or [])
