"""The reasoner's system-prompt search for one model, tracked in MLflow.

One run for the search, holding the best-so-far curve (``search/best`` per round), the
winning prompt (artifact ``system_prompt.txt``, tag ``system_prompt_hash``) and its report on
the held-out test split: shapes-GenEval-R drawn with no reasoner, with the seed prompt and
with the searched one, and plain shapes-GenEval with no reasoner and with the searched one
(``test/<set>/<condition>/<category>``). Beside them, ``r/literal`` draws each
shapes-GenEval-R prompt worded plainly from its spec: the most a rewrite can gain. Every
candidate is a child run tagged ``system_prompt_hash`` and ``parent_candidate``, with its
prompt, its dev score per category, the edit that made it and the failure summary it was
made from.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from prefect import get_run_logger, task

import mlflow
from lens_model import atomic, defaults
from lens_model.eval.geneval import R_PROMPT_SET_VERSION, EvalProtocol, pipeline_generator
from lens_model.pipeline import load_pipeline
from lens_model.reasoner.scoring import as_score, dev_prompts, judged, literal
from lens_model.reasoner.search import (
    OVERALL,
    Candidate,
    EditSearch,
    LLMSearch,
    Optimiser,
    prompt_hash,
    search,
)
from lens_model.recipe import Recipe
from tasks import tracking
from tasks.cache import keyed_by, trained_model
from tasks.reasoner_stage import REASONER_CODE, load_reasoner
from tasks.results import ReasonerModel, SearchedPrompt

SEARCH_CODE = (*REASONER_CODE, "lens_model/reasoner/search.py",
               "lens_model/reasoner/scoring.py", "tasks/prompt_search.py", "lens_model/eval")


def _search_inputs(params: dict[str, Any]) -> dict[str, Any]:
    recipe: Recipe = params["recipe"]
    return {"reasoner": recipe.reasoner, "eval": recipe.eval, "seed": recipe.seed,
            **trained_model(params["model_dir"]), "reasoner_dir": params["reasoner"].dir,
            "heldout": params["reasoner"].heldout}


def _optimiser(recipe: Recipe) -> Optimiser:
    s = recipe.reasoner.search
    if s.optimiser == "openai":
        return LLMSearch(recipe.reasoner.endpoint, recipe.reasoner.max_system_chars)
    return EditSearch()


@task(name="reasoner-search", persist_result=True,
      cache_policy=keyed_by(_search_inputs, SEARCH_CODE))
def search_task(recipe: Recipe, model_dir: str, reasoner: ReasonerModel,
                dvc_hash: str = "", parent_run_id: str = "") -> SearchedPrompt:
    """Search the system prompt for the model at ``model_dir`` with the reasoner stage's
    ``reasoner``; returns the winner, its test-split scores, the curve and the run."""
    section, s = recipe.reasoner, recipe.reasoner.search
    logger = get_run_logger()
    start = time.perf_counter()
    pipe = load_pipeline(model_dir)
    rewriter = load_reasoner(section, reasoner.dir)
    plain = EvalProtocol.from_recipe(recipe.eval)
    hard = EvalProtocol.from_recipe(recipe.eval, version=R_PROMPT_SET_VERSION)
    generate = pipeline_generator(pipe, plain)  # both sets share the sampling settings
    test = [p.text for p in plain.prompts() + hard.prompts()]  # all of eval's: none in dev
    dev = dev_prompts(s.dev_per_category, s.dev_seed, test)
    # the report's share of eval's prompts: prompt_set(n) is the first n of each category
    n = min(s.test_per_category, recipe.eval.prompts_per_category)
    plain_test, hard_test = (replace(p, prompts_per_category=n) for p in (plain, hard))
    truncates = pipe.encoder.truncates
    exp = tracking.experiment(recipe.tracking.experiment)
    tags = tracking.lineage(recipe, dvc_hash, parent_run_id) | {
        "lens.stage": "reasoner-search", "lens.model_dir": model_dir,
        "lens.reasoner_dir": reasoner.dir}
    truncation: dict[str, float] = {}

    def score(system: str) -> Any:
        report, stats = judged(generate, plain, dev, rewriter, system, truncates)
        truncation[prompt_hash(system)] = stats["truncation_rate"]
        return as_score(report)

    with mlflow.start_run(experiment_id=exp, run_name=f"reasoner-search-{recipe.name}",
                          tags=tags) as run:
        mlflow.log_params({k: v for k, v in recipe.flat().items()
                           if k.startswith("reasoner.search.")} | {"dev_prompts": len(dev)})

        def on_candidate(cand: Candidate) -> None:
            child_tags = tracking.lineage(recipe, dvc_hash, run.info.run_id) | {
                "lens.stage": "reasoner-candidate", "system_prompt_hash": cand.hash,
                "parent_candidate": cand.parent or "", "edit": cand.edit}
            with mlflow.start_run(experiment_id=exp, run_name=f"candidate-{cand.hash}",
                                  tags=child_tags, nested=True):
                mlflow.log_params({"round": cand.round, "edit": cand.edit})
                mlflow.log_metrics({f"dev/{k}": v for k, v in cand.score.scores.items()}
                                   | {"truncation_rate": truncation[cand.hash]})
                mlflow.log_text(cand.prompt, "system_prompt.txt")
                mlflow.log_text(cand.summary or "(the seed: made from no summary)",
                                "failure_summary.txt")
                mlflow.log_dict(cand.score.failures, "failures.json")
            logger.info(f"candidate {cand.hash} (round {cand.round}, {cand.edit}): dev "
                        f"{cand.overall:.3f}")

        result = search(s.seed_prompt, score, _optimiser(recipe),
                        candidates_per_round=s.candidates_per_round, patience=s.patience,
                        max_rounds=s.max_rounds, rng_seed=recipe.seed,
                        on_candidate=on_candidate)
        for step, best in enumerate(result.curve):
            mlflow.log_metric("search/best", best, step=step)
        best = result.best
        # Each condition: the protocol it is judged on, the prompts drawn (None: the
        # protocol's own), the rewriter and its system prompt.
        conditions = {("r", "none"): (hard_test, None, None, ""),
                      ("r", "literal"): (hard_test, literal(hard_test.prompts()), None, ""),
                      ("r", "seed"): (hard_test, None, rewriter, s.seed_prompt),
                      ("r", "searched"): (hard_test, None, rewriter, best.prompt),
                      ("plain", "none"): (plain_test, None, None, ""),
                      ("plain", "searched"): (plain_test, None, rewriter, best.prompt)}
        scores: dict[str, dict[str, float]] = {}
        metrics: dict[str, float] = {}
        for (name, condition), (protocol, prompts, who, system) in conditions.items():
            report, stats = judged(generate, protocol, prompts, who, system, truncates)
            scores[f"{name}/{condition}"] = report.scores
            metrics |= {f"test/{name}/{condition}/{k}": v for k, v in report.scores.items()}
            metrics[f"test/{name}/{condition}/truncation_rate"] = stats["truncation_rate"]
        # the rewriter's counters over the whole search: empty answers (the user's prompt was
        # drawn instead) and answers cut at max_new_tokens
        counters = {f"reasoner/{k}": float(v) for k, v in rewriter.stats.items()}
        mlflow.log_metrics(metrics | counters | {"search/rounds": result.rounds,
                                                 "search/candidates": len(result.candidates)})
        mlflow.set_tags({"system_prompt_hash": best.hash, "lens.search_stopped": result.stopped,
                         "lens.r_eval_hash": hard_test.hash(),
                         "lens.eval_hash": plain_test.hash()})
        mlflow.log_text(best.prompt, "system_prompt.txt")
    path = defaults.lens_home() / "reasoner" / "prompts" / f"{best.hash}.txt"
    atomic.write_text(path, best.prompt)
    gain = scores["r/searched"][OVERALL] - scores["r/none"][OVERALL]
    logger.info(f"searched system prompt {best.hash} after {result.rounds} rounds "
                f"({result.stopped}): shapes-GenEval-R {scores['r/none'][OVERALL]:.3f} -> "
                f"{scores['r/searched'][OVERALL]:.3f} ({gain:+.3f}) on the test split")
    return SearchedPrompt(best.prompt, best.hash, str(path), scores, list(result.curve),
                          result.rounds, result.stopped, run.info.run_id, hard_test.hash(),
                          time.perf_counter() - start)
