"""The RL prompt-set stage: build from the taxonomy -> GX contract -> DVC version -> MLflow run.

The set lands in the DVC repo at ``data/rl_prompts/`` (``prompts.parquet`` and the contract
result ``contract.json``), the ``rl_prompts`` stage of dvc.yaml, which ``lens rl prompts``
(the stage's command) writes byte for byte the same. No prompt is a shapes-GenEval prompt of
the recipe's evaluation protocol, so RL never trains on the held-out evaluation.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from prefect import task

import mlflow
from lens_model import atomic
from lens_model.recipe import Recipe
from lens_model.rl import taxonomy as taxonomy_mod
from lens_model.rl.prompts import (
    SCHEMA,
    RLPrompt,
    build_prompts,
    counts,
    to_rows,
    write_prompts,
)
from lens_model.rl.rubrics import MAX_RUBRICS
from lens_model.secrets import redact_mapping
from tasks import dvc_ops, gx_contract, tracking
from tasks.cache import keyed_by
from tasks.dataset import ContractFailed, code_fingerprint
from tasks.results import PromptSet

STAGE, OUT = "rl_prompts", "data/rl_prompts"
PROMPTS, CONTRACT = "prompts.parquet", "contract.json"
# the code the set's bytes depend on (dvc.yaml's rl_prompts deps name the same files)
RL_PROMPTS_CODE = ("lens_model/rl/taxonomy.py", "lens_model/rl/prompts.py",
                   "lens_model/rl/rubrics.py", "lens_model/rl/llm.py",
                   "lens_model/data/world.py", "lens_model/data/captions.py",
                   "lens_model/atomic.py", "tasks/rl_prompts.py", "tasks/gx_contract.py")
RL_KEYS = ("taxonomy", "prompt_backend", "endpoint", "num_prompts", "gold_frac",
           "min_dimensions", "max_dimensions")
_VALIDATIONS: dict[tuple[int, int], Any] = {}  # dimension bounds -> GX validation definition


class PromptContractFailed(ContractFailed):
    """The prompt set broke its contract; the message names the expectations and rows."""


def _taxonomy_digest(name: str) -> str:
    try:
        return hashlib.sha256(taxonomy_mod.resolve(name).read_bytes()).hexdigest()[:16]
    except taxonomy_mod.TaxonomyError as exc:  # the task itself raises it, in full
        return f"error: {exc}"


def what_decides(recipe: Recipe) -> dict[str, Any]:
    """What decides the set's content: seed, the rl prompt keys, the taxonomy file's bytes
    and the evaluation prompts it must avoid (not the recipe's training settings)."""
    return {"seed": recipe.seed, "rl": recipe.rl.model_dump(mode="json", include=set(RL_KEYS)),
            "taxonomy_sha": _taxonomy_digest(recipe.rl.taxonomy),
            "eval": recipe.eval.model_dump(mode="json",
                                           include={"prompts_per_category", "prompt_seed"})}


def stamp(recipe: Recipe) -> str:
    """What outputs on disk must have been built from: these inputs and this code."""
    blob = json.dumps([what_decides(recipe), code_fingerprint(RL_PROMPTS_CODE)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _task_inputs(params: dict[str, Any]) -> dict[str, Any]:
    """The cache key's inputs: the recipe name (it names the MLflow run) and the repo too."""
    return what_decides(params["recipe"]) | {"name": params["recipe"].name,
                                             "repo": str(Path(params["repo"]).resolve())}


def outputs_current(recipe: Recipe, repo: str | Path) -> bool:
    """Whether the repo holds the set these inputs and this code build (for a flow's
    ``refresh_cache``: a cache hit must not stand in for a deleted or overwritten set)."""
    out = Path(repo) / OUT
    try:
        report = json.loads((out / CONTRACT).read_text())
    except (OSError, ValueError):
        return False
    return (out / PROMPTS).is_file() and report.get("stamp") == stamp(recipe)


# ---------------------------------------------------------------- contract


def _frame(prompts: list[RLPrompt]) -> pd.DataFrame:
    df = pd.DataFrame(to_rows(prompts), columns=SCHEMA.names)
    shared = df.groupby("item")["split"].transform("nunique") > 1
    return df.assign(shared_item=shared.astype(bool))


def _validation(lo: int, hi: int) -> Any:
    """One GX validation definition per dimension bounds, on tasks/gx_contract.py's context."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    if (lo, hi) not in _VALIDATIONS:
        ctx = gx_contract._context()  # GX keeps one context per process: share it
        name = f"lens-rl-prompts-{lo}-{hi}"
        batch = ctx.data_sources.add_pandas(name).add_dataframe_asset("prompts") \
            .add_batch_definition_whole_dataframe("all")
        suite = gx.ExpectationSuite(name=name, expectations=[
            gxe.ExpectColumnValuesToNotBeNull(column="text"),
            gxe.ExpectColumnValuesToBeUnique(column="text"),
            gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "gold"]),
            gxe.ExpectColumnValuesToBeBetween(column="n_dimensions", min_value=lo,
                                              max_value=hi),
            gxe.ExpectColumnValuesToBeBetween(column="n_rubrics", min_value=1,
                                              max_value=MAX_RUBRICS),
            gxe.ExpectColumnValuesToBeInSet(column="shared_item", value_set=[False]),
        ])
        definition = gx.ValidationDefinition(name=name, data=batch, suite=ctx.suites.add(suite))
        _VALIDATIONS[(lo, hi)] = ctx.validation_definitions.add(definition)
    return _VALIDATIONS[(lo, hi)]


def check_contract(prompts: list[RLPrompt], lo: int, hi: int) -> dict[str, Any]:
    """Run the prompt-set suite: distinct texts, lo..hi dimensions, 1..MAX_RUBRICS rubrics,
    no item in both splits. Returns a JSON-able result whose failing rows are prompt ids."""
    df = _frame(prompts)
    with gx_contract._LOCK:
        raw = _validation(lo, hi).run(batch_parameters={"dataframe": df},
                                      result_format="COMPLETE").to_json_dict()
    expectations = []
    for res in raw["results"]:
        cfg, result = res["expectation_config"], res.get("result", {})
        rows = sorted({str(df["prompt_id"].iloc[i]) for i in
                       result.get("unexpected_index_list") or []})
        expectations.append({
            "expectation": cfg["type"], "column": cfg["kwargs"].get("column"),
            "kwargs": {k: v for k, v in cfg["kwargs"].items() if k not in ("batch_id",
                                                                            "column")},
            "success": bool(res["success"]),
            "unexpected_count": int(result.get("unexpected_count") or 0),
            "element_count": int(result.get("element_count") or 0), "rows": rows[:20]})
    expectations.sort(key=lambda e: (e["column"] or "", e["expectation"]))  # GX reorders
    return {"passed": all(e["success"] for e in expectations), "expectations": expectations}


def build_and_check(recipe: Recipe, out: str | Path) -> dict[str, Any]:
    """Build the recipe's set, write ``out/prompts.parquet`` and ``out/contract.json``, and
    raise :class:`PromptContractFailed` (after writing both) when the contract fails."""
    from lens_model.eval.geneval import EvalProtocol  # heavy: torch and diffusers

    out = Path(out)
    started = time.perf_counter()
    evaluation = {p.text for p in EvalProtocol.from_recipe(recipe.eval).prompts()}
    prompts = build_prompts(recipe, exclude=evaluation)
    result = check_contract(prompts, recipe.rl.min_dimensions, recipe.rl.max_dimensions)
    report = {"recipe": recipe.name, "stamp": stamp(recipe), "counts": counts(prompts), **result}
    write_prompts(prompts, out / PROMPTS)
    atomic.write_json(out / CONTRACT, report)
    if not result["passed"]:
        failed = [f"{e['expectation']} on {e['column']}: {e['unexpected_count']} rows, e.g. "
                  f"{', '.join(e['rows'][:5])}" for e in result["expectations"]
                  if not e["success"]]
        raise PromptContractFailed(f"recipe {recipe.name}: the RL prompt set failed its "
                                   f"contract: {'; '.join(failed)}. Report: {out / CONTRACT}")
    return {"path": str(out / PROMPTS), "contract": str(out / CONTRACT),
            "counts": report["counts"], "compute_s": time.perf_counter() - started}


# ---------------------------------------------------------------- DVC and MLflow


def version(root: Path) -> dict[str, str]:
    """``dvc commit`` + ``push`` of the rl_prompts stage; its hash from dvc.lock."""
    with dvc_ops.serialized(root):
        remote = dvc_ops.ensure_remote(root)
        dvc_ops.dvc(root, "commit", "--force", STAGE)
        dvc_ops.dvc(root, "push", STAGE)
        lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    outs = lock.get("stages", {}).get(STAGE, {}).get("outs", [])
    md5 = next((o["md5"] for o in outs if o["path"] == OUT), "")
    if not md5:
        raise dvc_ops.DvcError(f"dvc.lock in {root} records no output {OUT} of stage {STAGE}; "
                               "check dvc.yaml")
    return {"dvc_hash": md5.removesuffix(".dir"), "remote": remote}


def log_prompt_input(path: str | Path, dvc_hash: str, name: str,
                     context: str = "training") -> None:
    """Log the prompt set at ``path`` as a dataset input of the active MLflow run."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    if mlflow.active_run() is None:
        raise RuntimeError(f"log_prompt_input({name!r}) needs an active MLflow run; call it "
                           "inside mlflow.start_run()")
    with warnings.catch_warnings():  # MLflow registers its local source twice and says so
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
        source = resolve_dataset_source(str(Path(path).resolve()))
    mlflow.log_input(MetaDataset(source=source, name=name, digest=dvc_hash[:36]),
                     context=context, tags={"dvc_hash": dvc_hash})


def _metric(key: str) -> str:
    return "prompts." + key.replace(" ", "_")


def log_run(recipe: Recipe, built: dict[str, Any], versioned: dict[str, str], root: Path,
            parent_run_id: str = "") -> str:
    """The MLflow child run ``rl-prompts-<recipe>``: params, counts, contract, the set."""
    exp = tracking.experiment(recipe.tracking.experiment)
    tags = tracking.lineage(recipe, versioned["dvc_hash"], parent_run_id, cwd=root) | {
        "lens.stage": STAGE, "lens.contract_passed": "true",
        "lens.dvc_remote": versioned["remote"]}
    with mlflow.start_run(experiment_id=exp, run_name=f"rl-prompts-{recipe.name}",
                          tags=redact_mapping(tags)) as run:
        params = {k: v for k, v in recipe.flat().items()
                  if k == "seed" or (k.startswith("rl.") and k.split(".")[1] in RL_KEYS)}
        mlflow.log_params({k: str(v)[:500] for k, v in redact_mapping(params).items()})
        mlflow.log_metrics({_metric(k): n for k, n in built["counts"].items()}
                           | {"seconds.rl_prompts": built["compute_s"]})
        log_prompt_input(built["path"], versioned["dvc_hash"], f"{recipe.name}-rl-prompts")
        mlflow.log_artifact(built["contract"], artifact_path="contract")
        return run.info.run_id


@task(name="rl-prompts", version="1", persist_result=True,
      cache_policy=keyed_by(_task_inputs, RL_PROMPTS_CODE))
def rl_prompts_task(recipe: Recipe, repo: str, parent_run_id: str = "") -> PromptSet:
    """Build, check, version and track the recipe's RL prompt set."""
    root = dvc_ops.repo_root(repo)
    dvc_ops.write_params(root, recipe)  # the stage's params, as `dvc commit` reads them
    built = build_and_check(recipe, root / OUT)
    versioned = version(root)
    run_id = log_run(recipe, built, versioned, root, parent_run_id)
    return PromptSet(built["path"], versioned["dvc_hash"], run_id, built["counts"],
                     round(built["compute_s"], 3))
