"""Stage cache keys from what decides a stage's output, never from per-run ids."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from pydantic import BaseModel

from tasks.dataset import code_fingerprint


def _plain(value: Any) -> Any:
    """A recipe section as its JSON tree; anything else as its string."""
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else str(value)


def keyed_by(pick: Callable[[dict[str, Any]], Any], code: tuple[str, ...]) -> CachePolicy:
    """Cache on what ``pick`` takes from the task's parameters, on the task's source and on
    ``code``'s files: the parent MLflow run id, new every pipeline run, stays out of the key."""
    def key(context: Any, parameters: dict[str, Any]) -> str:
        blob = json.dumps([pick(parameters), code_fingerprint(code)], sort_keys=True,
                          default=_plain)
        return hashlib.sha256(blob.encode()).hexdigest()

    return TASK_SOURCE + CachePolicy.from_cache_key_fn(key)


def trained_model(model_dir: str) -> dict[str, Any]:
    """A training final/ folder's identity for a cache key: its path (one per training job)
    and its lens.json (the step and recipe it holds)."""
    lens_json = Path(model_dir) / "lens.json"
    return {"model": model_dir, "lens.json": lens_json.read_text() if lens_json.is_file() else None}
