"""Embedded defaults: one place that decides where local state lives.

Everything runs with no server: Prefect starts an ephemeral server with its home under
``$LENS_HOME``, MLflow writes to SQLite there, and the DVC remote is a folder there. Every
default yields to the standard variable a user has set (``PREFECT_API_URL``,
``MLFLOW_TRACKING_URI``, a DVC remote in the repo's config, ...). This module imports
nothing heavy, so every layer (CLI, flows, tasks, tests) may call it first.
"""

from __future__ import annotations

import os
from pathlib import Path

# Telemetry off and hubs offline: this machine has no internet, and users' runs stay private.
OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "DS_ACCELERATOR": "cpu",
}


def lens_home() -> Path:
    """The state directory: ``$LENS_HOME``, else ``.lens/`` in the working directory."""
    return Path(os.environ.get("LENS_HOME", ".lens")).expanduser().resolve()


def mlflow_uri(home: Path | None = None) -> str:
    default = f"sqlite:///{(home or lens_home()) / 'mlflow.db'}"
    return os.environ.get("MLFLOW_TRACKING_URI") or default


def mlflow_artifact_root(home: Path | None = None) -> Path:
    """Where artifacts go when MLflow runs on the embedded SQLite store."""
    return (home or lens_home()) / "mlartifacts"


def dvc_remote_url(home: Path | None = None) -> str:
    """The DVC remote used when the repo configures none: ``$LENS_DVC_REMOTE`` or a local folder."""
    return os.environ.get("LENS_DVC_REMOTE") or str((home or lens_home()) / "dvc-remote")


def apply() -> Path:
    """Set the embedded defaults in ``os.environ`` (never overriding a user's value)."""
    home = lens_home()
    home.mkdir(parents=True, exist_ok=True)
    defaults = dict(OFFLINE_ENV)
    defaults.update(
        LENS_HOME=str(home),
        PREFECT_HOME=str(home / "prefect"),
        MLFLOW_TRACKING_URI=mlflow_uri(home),
        TORCH_EXTENSIONS_DIR=str(home / "torch_extensions"),
        DVC_SITE_CACHE_DIR=str(home / "dvc-site-cache"),
        # DeepSpeed's and HF's caches would otherwise land in the user's home directory.
        HF_HOME=str(home / "hf"),
        # Prefect logs the flow's own output; it should not warn about a missing UI build.
        PREFECT_UI_ENABLED="false",
        # Its first start on a fresh install (bytecode compiles, database migrations) took
        # over Prefect's 20 s default on this 2-core machine.
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return home
