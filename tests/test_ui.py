"""`lens ui`: MLflow's UI started on a local store, printing the newest pipeline run's URL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import mlflow
from tests.conftest import BIN, free_port


def test_ui_serves_the_local_store_and_points_at_the_newest_pipeline_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("lens-ui-test", artifact_location=str(tmp_path / "art"))
    runs = []
    for stage in ("pipeline", "pipeline", "pretrain"):  # the stage run is newest: not chosen
        runs.append(client.create_run(exp, tags={"lens.stage": stage}).info.run_id)
        time.sleep(0.01)
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.Popen([str(BIN / "lens"), "ui", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while not line.startswith("MLflow UI:") and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "lens ui exited before printing its URL"
        base = f"http://127.0.0.1:{port}"
        assert line.split()[2] == f"{base}/#/experiments/{exp}/runs/{runs[1]}"
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={runs[1]}",
                                    timeout=10) as got:  # the server reads this store
            tags = {t["key"]: t["value"] for t in json.load(got)["run"]["data"]["tags"]}
        assert tags["lens.stage"] == "pipeline"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
