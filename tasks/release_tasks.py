"""Prefect tasks over the promotion logic (``tasks/promote.py``), for the pipeline and the
release flow."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

import mlflow
from tasks import promote


def aliases(name: str, version: str) -> list[str]:
    return sorted(mlflow.MlflowClient().get_model_version(name, str(version)).aliases)


@task(name="promote")
def promote_task(name: str, version: str, dry_run: bool = False, reason: str = "",
                 strict: bool = False) -> dict[str, Any]:
    """Gate and promote ``version``. A failing gate leaves the aliases as they were; it is
    reported in the result, or raised with ``strict`` (the release flow then fails)."""
    logger = get_run_logger()
    try:
        report = promote.promote(name, version, dry_run, reason)
        if strict:  # a dry run reports failures; strict stops here
            report.raise_if_failed()
    except promote.PromotionError as exc:
        if strict:
            raise
        logger.warning(f"not promoted: {exc}")
        return {"promoted": False, "reason": str(exc), "aliases": aliases(name, version)}
    promoted = report.passed and not dry_run
    logger.info(f"{name} v{version}: gates {'passed' if report.passed else 'failed'}"
                f"{'' if not promoted else ', now @champion'}")
    return {"promoted": promoted, "gates": report.to_json(), "aliases": aliases(name, version)}


@task(name="rollback")
def rollback_task(name: str, reason: str = "") -> dict[str, Any]:
    old, new = promote.rollback(name, reason)
    get_run_logger().info(f"{name}: champion moved back from v{old} to v{new}")
    return {"from": old, "to": new}
