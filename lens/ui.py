"""``lens ui``: MLflow's UI on this machine's store, pointed at the latest pipeline run.

With the embedded defaults the store is SQLite under ``$LENS_HOME``, which no server serves,
so this starts ``mlflow server`` on it (one worker, loopback by default) in the foreground and
prints the URL of the newest run tagged ``lens.stage = pipeline``. When ``MLFLOW_TRACKING_URI``
already names a server, it only prints that URL.
"""

from __future__ import annotations

import subprocess
import time

from lens.services import healthy, tool_path
from lens_model import defaults


def latest_pipeline_run(tracking_uri: str) -> tuple[str, str] | None:
    """``(experiment id, run id)`` of the newest pipeline parent run in the store, or None."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, "tags.`lens.stage` = 'pipeline'",
                              order_by=["attributes.start_time DESC"], max_results=1) if ids \
        else []
    return (runs[0].info.experiment_id, runs[0].info.run_id) if runs else None


def run_url(base: str, found: tuple[str, str] | None) -> str:
    """The UI page of a run, or the UI's front page when there is none yet."""
    if found is None:
        return base
    return f"{base.rstrip('/')}/#/experiments/{found[0]}/runs/{found[1]}"


def _up(base: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({proc.returncode}) while starting; is "
                               f"the port taken? Pick another with --port")
        if healthy(f"{base}/health"):
            return
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"mlflow server did not answer at {base}/health within {timeout:.0f} s")


def serve(host: str, port: int, timeout: float = 120.0) -> int:
    """Print the latest pipeline run's URL; start the UI on a local store and wait on it."""
    uri = defaults.mlflow_uri()
    if uri.startswith(("http://", "https://")):
        print(f"MLflow UI: {run_url(uri, latest_pipeline_run(uri))}", flush=True)
        return 0
    found = latest_pipeline_run(uri)
    cmd = [tool_path("mlflow"), "server",
           "--backend-store-uri", uri,
           "--default-artifact-root", str(defaults.mlflow_artifact_root()),
           "--host", host, "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd)
    base = f"http://{host}:{port}"
    try:
        _up(base, proc, timeout)
        if found is None:
            print("no pipeline run in this store yet: `make run` makes one", flush=True)
        print(f"MLflow UI: {run_url(base, found)}  (Ctrl-C stops it)", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
