"""The data flow: plan -> prepare shards -> validate shards -> merge -> version -> track.

Run it with ``lens data tiny`` (or ``lens data RECIPE --set data.num_samples=64``). Shards
are mapped over the recipe's task runner: threads by default, Dask (``data.task_runner:
dask``) to spread shards over a local cluster or a remote scheduler (``data.dask_address``).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from prefect import flow, runtime, tags, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from lens_model.recipe import DataSection, Recipe, load_recipe
from tasks import data_flow_tasks as t
from tasks.dataset import ContractFailed, outputs_current


def task_runner(d: DataSection) -> Any:
    """The task runner the recipe's data section asks for."""
    if d.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=d.workers)
    from prefect_dask import DaskTaskRunner

    if d.dask_address:
        return DaskTaskRunner(address=d.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": d.workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


@flow(name="lens-data", version="1", log_prints=True)
def data_flow(recipe: str = "tiny", overrides: list[str] | None = None,
              repo: str | None = None, parent_run_id: str = "") -> dict[str, Any]:
    rec: Recipe = load_recipe(recipe, overrides)
    started = time.perf_counter()
    ws = t.workspace(rec, repo)
    chunks = t.plan(rec, ws["raw"], ws["out"])
    # A cache hit must not stand in for outputs someone deleted or another recipe or older
    # code overwrote: then recompute.
    prepared_ok, validated_ok, merged_ok = outputs_current(rec, Path(ws["raw"]), Path(ws["out"]),
                                                           len(chunks))
    prepared = t.prepare.with_options(refresh_cache=not prepared_ok).map(
        unmapped(rec), chunks, range(len(chunks)), unmapped(ws["raw"]))
    validated = t.validate.with_options(refresh_cache=not validated_ok).map(
        unmapped(rec), prepared, unmapped(ws["out"]))
    prepared_refs, validated_refs = prepared.result(), validated.result()
    timings = {"prepare_validate": time.perf_counter() - started}
    merged = t.merge.with_options(refresh_cache=not merged_ok)(
        rec, prepared_refs, validated_refs, ws["out"])
    timings["merge"] = time.perf_counter() - started - timings["prepare_validate"]
    cached = sum(f.state.name == "Cached" for f in [*prepared, *validated])
    if not merged["passed"]:
        raise ContractFailed(f"recipe {rec.name}: the batch failed the data contract: "
                             f"{'; '.join(merged['why'])}. Report: {merged['summary']}")
    mark = time.perf_counter()
    versioned = t.version(ws["root"])
    timings["version"] = time.perf_counter() - mark
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    run_id = t.track(rec, merged, versioned, timings, ws["out"], ws["root"], parent_run_id)
    return {"recipe": rec.name, "recipe_hash": rec.hash(), "dvc_hash": versioned["dvc_hash"],
            "dvc_remote": versioned["remote"], "valid": merged["valid"],
            "quarantined": merged["quarantined"], "inputs": merged["inputs"],
            "reasons": merged["reasons"], "mlflow_run_id": run_id,
            "manifest": merged["manifest"], "quarantine": merged["quarantine"],
            "report": merged["report"], "shards": len(chunks), "shard_tasks_cached": cached,
            "seconds": {k: round(v, 2) for k, v in timings.items()},
            "prefect_flow_run_id": str(runtime.flow_run.id)}


def shared_api(d: DataSection) -> AbstractContextManager[Any]:
    """Dask workers are other processes: with no Prefect server configured, start this
    process's ephemeral server now and name its URL, so their task runs report to it too
    (otherwise each worker would start a temporary server of its own)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if d.task_runner != "dask" or PREFECT_API_URL.value():
        return nullcontext()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one Prefect's own ephemeral mode would use
    server.start()
    return temporary_settings({PREFECT_API_URL: server.api_url})


def run(recipe: str, overrides: list[str] | None = None, repo: str | None = None) -> dict[str, Any]:
    """Run the data flow on the task runner the recipe names."""
    rec = load_recipe(recipe, overrides)
    with shared_api(rec.data), tags(f"recipe:{rec.name}", f"recipe-hash:{rec.hash()}"):
        return data_flow.with_options(task_runner=task_runner(rec.data))(
            recipe, overrides or [], repo)
