"""`lens ui`: which run's URL it prints. The server it starts, on a real store, is what
tests/test_browser.py drives Chromium through."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
from lens import ui


def test_ui_points_at_the_newest_pipeline_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    assert ui.latest_pipeline_run(uri) is None  # an empty store: the UI's front page
    assert ui.run_url("http://h:1", None) == "http://h:1"
    exp = client.create_experiment("lens-ui-test", artifact_location=str(tmp_path / "art"))
    runs = []
    for stage in ("pipeline", "pipeline", "pretrain"):  # the stage run is newest: not chosen
        runs.append(client.create_run(exp, tags={"lens.stage": stage}).info.run_id)
        time.sleep(0.01)
    found = ui.latest_pipeline_run(uri)
    assert found == (exp, runs[1])
    assert ui.run_url("http://h:1/", found) == f"http://h:1/#/experiments/{exp}/runs/{runs[1]}"
