"""The data flow against real components: Prefect's test server, a git+DVC repo with local
and S3 (moto_server) remotes, MLflow on SQLite, Great Expectations, a local Dask cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import mlflow
from lens import cli
from lens_model.recipe import load_recipe
from tasks import dvc_ops
from tests.conftest import BIN, free_port, run

SMALL = ["data.num_samples=48", "data.samples_per_shard=16"]


def _flow(repo: Path, extra: list[str] | None = None) -> dict:
    from flows.data import run as run_flow

    return run_flow("tiny", SMALL + (extra or []), str(repo))


def test_flow_versions_tracks_and_reuses_cache(prefect_server, dvc_repo: Path) -> None:
    first = _flow(dvc_repo)
    assert first["inputs"] == 48 == first["valid"] + first["quarantined"]
    assert first["valid"] >= 46 and first["shards"] == 3
    manifest = pd.read_parquet(first["manifest"])
    assert len(manifest) == first["valid"] and manifest["sha256"].is_unique
    assert (Path(first["manifest"]).parent / manifest["shard"].iloc[0]).resolve().exists()

    # DVC: lock records the outputs, the remote holds them, DVC's own CLI agrees
    lock = yaml.safe_load((dvc_repo / "dvc.lock").read_text())
    out = lock["stages"]["validate"]["outs"][0]
    assert out["path"] == "data/dataset" and out["md5"].removesuffix(".dir") == first["dvc_hash"]
    # the data stages only: rl_prompts is the pipeline's, after pretraining
    status = run([sys.executable, "-m", "dvc", "status", "prepare", "validate"], dvc_repo).stdout
    assert "up to date" in status
    cloud = run([sys.executable, "-m", "dvc", "status", "--cloud"], dvc_repo).stdout
    assert "in sync" in cloud
    assert Path(first["dvc_remote"]).is_dir() and any(Path(first["dvc_remote"]).rglob("*"))

    # MLflow: lineage tags, counts, reasons, GX report, the dataset with the DVC hash
    client = mlflow.MlflowClient()
    data_run = client.get_run(first["mlflow_run_id"])
    tags = data_run.data.tags
    assert tags["lens.dvc_hash"] == first["dvc_hash"]
    assert tags["lens.recipe_hash"] == load_recipe("tiny", SMALL).hash()
    assert tags["lens.prefect_flow_run_id"] and tags["lens.git_commit"] != "unknown"
    assert data_run.data.metrics["data.valid"] == first["valid"]
    assert data_run.inputs.dataset_inputs[0].dataset.digest == first["dvc_hash"][:36]
    artifacts = {a.path for a in client.list_artifacts(data_run.info.run_id, "contract")}
    assert artifacts == {"contract/contract.json", "contract/contract.md"}

    # A rerun with nothing changed reuses every shard task and gives the same hash
    second = _flow(dvc_repo)
    assert second["shard_tasks_cached"] == 2 * second["shards"]
    assert second["dvc_hash"] == first["dvc_hash"]

    # A deleted output is recomputed, not served stale from the cache
    (dvc_repo / "data/raw/shard-000001.tar").unlink()
    third = _flow(dvc_repo)
    assert third["dvc_hash"] == first["dvc_hash"]
    assert (dvc_repo / "data/raw/shard-000001.tar").exists()

    # Outputs another recipe overwrote are rebuilt too, though this recipe's tasks are cached
    other = _flow(dvc_repo, ["seed=1"])
    assert other["dvc_hash"] != first["dvc_hash"] and other["shards"] == first["shards"]
    back = _flow(dvc_repo)
    assert back["dvc_hash"] == first["dvc_hash"] and back["shard_tasks_cached"] == 0


# slow: a second full data flow on Dask (40 s); the default run keeps the threaded runner's
# flow, this checks the Dask runner gives the same bytes (make test-all)
@pytest.mark.slow
def test_dask_runner_gives_the_same_dataset(prefect_server, dvc_repo: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    threads = _flow(dvc_repo)
    dask = _flow(dvc_repo, ["data.task_runner=dask", "data.workers=2"])
    assert dask["dvc_hash"] == threads["dvc_hash"]
    # the Dask workers' task runs are recorded on the flow's own server
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[dask["prefect_flow_run_id"]])))
    names = [r.name for r in runs if r.state and r.state.is_final()]
    assert sum(n.startswith("prepare-") for n in names) == dask["shards"]
    assert sum(n.startswith("validate-") for n in names) == dask["shards"]


def test_cli_json_last_line(prefect_server, dvc_repo: Path, capsys) -> None:
    code = cli.main(["data", "tiny", *sum([["--set", s] for s in SMALL], []),
                     "--repo", str(dvc_repo), "--json"])
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) >= {"dvc_hash", "valid", "quarantined", "mlflow_run_id", "manifest"}


def test_contract_failure_is_reported_and_not_versioned(prefect_server, dvc_repo: Path) -> None:
    from tasks.dataset import ContractFailed

    with pytest.raises(ContractFailed, match="rejection_rate"):
        _flow(dvc_repo, ["data.contract.min_area=100000"])  # every tiny image is too small
    report = json.loads((dvc_repo / "data/dataset/contract.json").read_text())
    assert not report["passed"] and report["reasons"]["area_below_min"] == 48
    assert not (dvc_repo / "dvc.lock").exists()


def test_dvc_repro_runs_the_stages_from_dvc_cli(dvc_repo: Path) -> None:
    dvc_ops.write_params(dvc_repo, load_recipe("tiny", SMALL))
    run([sys.executable, "-m", "dvc", "repro"], dvc_repo)
    assert (dvc_repo / "data/dataset/manifest.parquet").exists()
    assert "up to date" in run([sys.executable, "-m", "dvc", "status"], dvc_repo).stdout


@pytest.fixture
def moto_s3(monkeypatch):
    """A real S3-protocol server (moto_server) on 127.0.0.1 with one bucket."""
    import boto3

    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}.items():
        monkeypatch.setenv(var, value)
    s3 = boto3.client("s3", endpoint_url=url)
    for _ in range(100):
        try:
            s3.create_bucket(Bucket="lens-data")
            break
        except Exception:
            time.sleep(0.1)
    yield s3
    proc.terminate()
    proc.wait(10)


def test_push_to_s3_remote(moto_s3, dvc_repo: Path, monkeypatch) -> None:
    monkeypatch.setenv("LENS_DVC_REMOTE", "s3://lens-data/dvc")
    dvc_ops.write_params(dvc_repo, load_recipe("tiny", SMALL))
    run([sys.executable, "-m", "dvc", "repro", "validate"], dvc_repo)  # the data stages
    version = dvc_ops.commit_and_push(dvc_repo)
    assert version["remote"] == "s3://lens-data/dvc"
    keys = [o["Key"] for o in moto_s3.list_objects_v2(Bucket="lens-data")["Contents"]]
    assert any(version["dvc_hash"] in k.replace("/", "") for k in keys)
    assert "in sync" in run([sys.executable, "-m", "dvc", "status", "--cloud"], dvc_repo).stdout
