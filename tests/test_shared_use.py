"""The tiny pipeline on the team services (slow): MLflow on PostgreSQL with basic auth and
artifacts proxied to a moto S3 bucket, Prefect on PostgreSQL, the DVC remote on the same S3.

1. One run end to end; the registered model then loads by alias through the server in a fresh
   process, and its artifacts are objects in the bucket.
2. Shared use: two runs at once (two processes, one DVC repo and working directory, one
   LENS_HOME, different pretraining steps) both finish with every metric, both versions and
   consistent aliases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import mlflow

if TYPE_CHECKING:  # importing it here would stop pytest rewriting its asserts as a plugin
    from tests.services_fixtures import Stack

pytest_plugins = ["tests.services_fixtures"]  # pg_names, moto_s3, stack
SHORT = ["data.num_samples=64", "data.samples_per_shard=32", "vae.steps=4",
         "pretrain.log_every=2", "pretrain.sample_every=3", "pretrain.ckpt_every=3",
         "eval.prompts_per_category=2", "gates.min_overall=0", "gates.max_latency_s=60"]
LOAD = """
import io
import mlflow, pandas as pd
from PIL import Image
model = mlflow.pyfunc.load_model("models:/lens-tiny@candidate")
out = model.predict(pd.DataFrame({"prompt": ["a photo of a red circle"]}),
                    params={"steps": 2, "cfg": 3.0, "size": "48x24", "seed": 0})
print(Image.open(io.BytesIO(out["image"][0])).size)
"""


def client_env(stack: Stack, home: Path) -> dict[str, str]:
    """A pipeline process's environment: the servers' URLs and login, S3 for DVC only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LENS_MLFLOW", "PREFECT_"))}
    return env | stack.client_env | stack.s3.env | {
        "LENS_HOME": str(home), "LENS_DVC_REMOTE": f"s3://{stack.s3.bucket}/dvc"}


def lens_run(env: dict[str, str], repo: Path, *overrides: str) -> subprocess.Popen[str]:
    args = ["run", "tiny", "--repo", str(repo), "--json",
            *sum((["--set", s] for s in [*SHORT, *overrides]), [])]
    return subprocess.Popen([sys.executable, "-m", "lens.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float = 1200) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
    assert proc.returncode == 0, f"lens run failed ({proc.returncode}):\n{err[-5000:]}"
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def as_client(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> mlflow.MlflowClient:
    for key, value in stack.client_env.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(stack.settings.mlflow_url)
    yield mlflow.MlflowClient(stack.settings.mlflow_url)
    mlflow.set_tracking_uri(None)


def logged_metrics(client: mlflow.MlflowClient, run_id: str) -> dict[tuple[str, int], float]:
    keys = client.get_run(run_id).data.metrics
    return {(m.key, m.step): m.value
            for key in keys for m in client.get_metric_history(run_id, key)}


def trainer_metrics(events: Path) -> dict[tuple[str, int], float]:
    """Every metric the trainer emitted (the pretrain task streams each into MLflow)."""
    out = {}
    for line in events.read_text().splitlines():
        event = json.loads(line)
        for key, value in event.get("metrics", {}).items():
            out[(key, int(event.get("step", 0)))] = float(value)
    return out


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_tiny_pipeline_end_to_end_on_team_services(stack: Stack, as_client,
                                                   dvc_repo: Path, tmp_path: Path) -> None:
    env = client_env(stack, tmp_path / "home")
    started = time.perf_counter()
    out = finish(lens_run(env, dvc_repo, "pretrain.steps=6"))
    wall = time.perf_counter() - started
    assert out["model"] == "lens-tiny" and out["aliases"] == ["candidate", "champion"]
    assert as_client.get_model_version_by_alias("lens-tiny", "candidate").version == \
        out["version"]
    pre = as_client.get_run(out["pretrain_run_id"])
    assert pre.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied, not client-side S3

    # A fresh process with only the server's URL and login loads the model by alias.
    load_env = {k: v for k, v in env.items() if not k.startswith(("AWS_", "MLFLOW_S3"))}
    load_env["LENS_HOME"] = str(tmp_path / "elsewhere")
    proc = subprocess.run([sys.executable, "-c", LOAD], env=load_env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "(48, 24)"

    # The artifacts really are objects in the bucket: the model, the eval grid, the data
    # contract; and the DVC remote holds the dataset.
    keys = stack.s3.keys("mlflow/")
    for suffix in ("/MLmodel", "/artifacts/pipeline/model_index.json", "/eval/grid.png",
                   "/model_card.md"):
        assert any(k.endswith(suffix) for k in keys), f"no *{suffix} in the bucket: {keys[:20]}"
    assert any("/contract/" in k for k in keys) and any("/samples/" in k for k in keys)
    assert stack.s3.keys("dvc/"), "the DVC remote on S3 is empty"
    print(f"\nend-to-end: pipeline {wall:.1f} s (stages {out['stages']}), "
          f"server startup {stack.seconds}")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_runs_at_once_share_the_servers_and_one_dvc_repo(
        stack: Stack, as_client, dvc_repo: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"  # one working directory, one LENS_HOME, one DVC repo
    env = client_env(stack, home)
    name = "lens-shared"
    started = time.perf_counter()
    procs = [lens_run(env, dvc_repo, f"pretrain.steps={steps}", f"tracking.model_name={name}",
                      "gates.max_regression=1") for steps in (6, 8)]
    outs = [finish(p, timeout=1700) for p in procs]
    wall = time.perf_counter() - started

    assert outs[0]["dvc_hash"] == outs[1]["dvc_hash"]  # the same data, versioned once
    assert outs[0]["pretrain_run_id"] != outs[1]["pretrain_run_id"]
    for out, steps in zip(outs, (6, 8), strict=True):
        pre = as_client.get_run(out["pretrain_run_id"])
        assert pre.info.status == "FINISHED" and pre.data.params["pretrain.steps"] == str(steps)
        emitted = trainer_metrics(home / "runs" / pre.data.tags["lens.job"] / "events.jsonl")
        logged = logged_metrics(as_client, pre.info.run_id)
        missing = sorted(set(emitted) - set(logged))
        assert not missing, f"run {pre.info.run_id}: metrics never reached MLflow: {missing}"
        assert {k: logged[k] for k in emitted} == pytest.approx(emitted)
        assert max(step for key, step in emitted if key == "train/loss") == steps
        parent = as_client.get_run(out["parent_run_id"])
        assert parent.info.status == "FINISHED"
        ev = as_client.get_run(parent.data.tags["lens.run.evaluate"])
        assert {f"eval/{k}": v for k, v in out["scores"].items()}.items() <= \
            ev.data.metrics.items()

    versions = {v.version: v for v in as_client.search_model_versions(f"name = '{name}'")}
    assert set(versions) == {outs[0]["version"], outs[1]["version"]} and len(versions) == 2
    for out in outs:
        tags = versions[out["version"]].tags
        assert tags["lens.run.pretrain"] == out["pretrain_run_id"]
        assert tags["lens.dvc_hash"] == out["dvc_hash"] and tags["lens.eval_hash"]
    aliases = as_client.get_registered_model(name).aliases
    assert set(aliases) == {"candidate", "champion"} and set(aliases.values()) <= set(versions)
    champion = versions[aliases["champion"]].tags
    # a champion carries its promotion record, written before the alias moved
    assert champion["lens.promoted_by"] and json.loads(champion["lens.gate_results"])["passed"]
    promoted = [o for o in outs if o["promoted"]]
    assert promoted, "neither run was promoted"
    # whoever won, the record of the current champion names the one it replaced (or none)
    assert champion["lens.previous_champion"] in ("", *versions)
    print(f"\nshared use: two concurrent runs {wall:.1f} s; versions {sorted(versions)}, "
          f"aliases {aliases}, promoted {[o['version'] for o in promoted]}")
