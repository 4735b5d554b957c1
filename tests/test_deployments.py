"""prefect.yaml against a real Prefect server on a fresh PostgreSQL database (started by
``lens.services``, as ``lens services up`` starts it): set up the pools, ``prefect deploy`` the
data flow, run it on a real process worker, and find its outputs; plus the concurrency of
GPU and DVC stages on Prefect's test server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from lens import infra, services
from lens_model.recipe import Recipe, load_recipe
from tasks import dvc_ops
from tasks import pretrain_stage as pretrain_mod
from tests.conftest import BIN, REPO, free_port
from tests.services_fixtures import drop_databases

SMALL = ["data.num_samples=48", "data.samples_per_shard=16"]


@pytest.fixture
def prefect_api(tmp_path: Path):
    """A Prefect server on fresh databases and a free port; stopped and dropped after."""
    tag = uuid.uuid4().hex[:10]
    settings = infra.from_env({
        "LENS_HOME": str(tmp_path / "services-home"), "LENS_PREFECT_PORT": str(free_port()),
        "LENS_PREFECT_DB": f"lens_deploy_{tag}_prefect",
        "LENS_MLFLOW_DB": f"lens_deploy_{tag}_mlflow",
        "LENS_MLFLOW_AUTH_DB": f"lens_deploy_{tag}_auth"})
    try:
        took = services.up(settings, ("prefect",), timeout=120)
        print(f"prefect server on PostgreSQL started in {took['prefect']:.1f} s")
        yield settings
    finally:
        services.down(settings, ("prefect",))
        drop_databases(settings.databases)


@pytest.fixture
def short_home():
    """A short LENS_HOME: tasks.dvc_ops.ensure_remote parses `dvc remote list`, whose table
    wraps a remote URL longer than the (80-column) terminal onto its own line."""
    path = Path(tempfile.mkdtemp(prefix="lens-w"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _cli_env(tmp_path: Path, api: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in services.CLIENT_ENV_VARS}
    return env | {"PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "client-prefect"),
                  "LENS_HOME": str(home), "PATH": f"{BIN}:{env['PATH']}",
                  "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}


def _run(cmd: list[str], env: dict[str, str], cwd: Path = REPO) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_data_deployment_runs_on_a_process_worker(prefect_api, dvc_repo: Path, tmp_path: Path,
                                                  short_home: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    started = time.perf_counter()
    env = _cli_env(tmp_path, prefect_api.prefect_api_url, short_home)
    out = _run([sys.executable, "-m", "lens.infra", "setup", "--gpu-slots", "h100=2"], env)
    assert "work pool lens-process (process)" in out and "work pool lens-gpu (kubernetes)" in out
    _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env)
    specs = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    spec = next(d for d in specs if d["name"] == "data")

    with temporary_settings({PREFECT_API_URL: prefect_api.prefect_api_url}), \
            get_client(sync_client=True) as client:
        pools = {p.name: p for p in client.read_work_pools()}
        for name, (kind, rel) in infra.POOLS.items():
            assert pools[name].type == kind
            assert pools[name].base_job_template == yaml.safe_load(
                (REPO / "infra" / rel).read_text())
        assert client.read_global_concurrency_limit_by_name("dvc").limit == 1
        assert client.read_concurrency_limit_by_tag("h100").concurrency_limit == 2
        flows = {"training_pipeline": "lens-pipeline", "data": "lens-data",
                 "release": "lens-release"}
        for d in specs:  # every deployment of prefect.yaml, as declared
            flow_name = flows[Path(d["entrypoint"].split(":")[0]).stem]
            got = client.read_deployment_by_name(f"{flow_name}/{d['name']}")
            assert (got.work_pool_name, got.parameters, got.entrypoint) == (
                d["work_pool"]["name"], d["parameters"], d["entrypoint"])
            assert got.job_variables == (d["work_pool"].get("job_variables") or {})
        deployment = client.read_deployment_by_name("lens-data/data")
        assert deployment.work_pool_name == spec["work_pool"]["name"] == infra.PROCESS_POOL
        assert deployment.parameters == spec["parameters"]
        assert deployment.pull_steps == [{"lens.infra.project_dir": {}}]
        (schedule,) = deployment.schedules
        assert schedule.schedule.cron == spec["schedules"][0]["cron"] == "0 2 * * *"
        # the nightly run must not fire into this checkout while the test's worker runs
        client.update_deployment_schedule(deployment.id, schedule.id, active=False)

        with open(tmp_path / "worker.log", "w") as log:
            worker = subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", infra.PROCESS_POOL,
                 "--type", "process", "--limit", "1"], cwd=tmp_path, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            run = run_deployment("lens-data/data", timeout=0,
                                 parameters={"overrides": SMALL, "repo": str(dvc_repo)})
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                run = client.read_flow_run(run.id)
                if run.state and run.state.is_final():
                    break
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-4000:]
                time.sleep(2)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        worker_log = (tmp_path / "worker.log").read_text()
        assert run.state is not None and run.state.is_completed(), (
            f"flow run ended {run.state}:\n{worker_log[-6000:]}")
        task_names = {t.name.split("-")[0] for t in client.read_task_runs(
            flow_run_filter=_by_id(run.id))}
        assert {"plan", "prepare", "validate", "merge", "version", "track"} <= task_names
        assert _held_limit(client, run.id, dvc_ops.DVC_LIMIT), "the dvc slot was never taken"

    # the flow ran in the worker's process, from the checkout, on the given DVC repo
    assert (dvc_repo / "data" / "dataset" / "manifest.parquet").is_file()
    lock = yaml.safe_load((dvc_repo / "dvc.lock").read_text())
    dvc_hash = lock["stages"]["validate"]["outs"][0]["md5"].removesuffix(".dir")
    import mlflow

    tracking = mlflow.MlflowClient(f"sqlite:///{short_home / 'mlflow.db'}")
    (data_run,) = tracking.search_runs(
        [tracking.get_experiment_by_name("lens-tiny").experiment_id],
        filter_string=f"tags.`lens.prefect_flow_run_id` = '{run.id}'")
    assert data_run.data.tags["lens.dvc_hash"] == dvc_hash
    print(f"deploy + worker run took {time.perf_counter() - started:.1f} s")


def _held_limit(client, flow_run_id: uuid.UUID, name: str, wait_s: float = 30) -> bool:
    """Whether a task of the flow run acquired the global concurrency limit ``name``, by the
    events Prefect emits (the server stores them a few seconds after they happen)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        wanted = EventFilter(  # made here: its time window ends when it is made
            event=EventNameFilter(name=["prefect.concurrency-limit.acquired"]),
            related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"]))
        events = client.read_events(wanted, limit=50).events  # the server's maximum
        if any(e.resource.get("prefect.resource.name") == name for e in events):
            return True
        time.sleep(1)
    return False


def _by_id(flow_run_id: uuid.UUID):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))


# --- concurrency on Prefect's test server ------------------------------------------------------

def test_pretraining_is_tagged_with_its_gpu_type(prefect_server, monkeypatch) -> None:
    from prefect import flow, task
    from prefect.context import TaskRunContext

    assert pretrain_mod.gpu_tags(load_recipe("lens-3.8b")) == {"a100"}
    assert pretrain_mod.gpu_tags(load_recipe("tiny")) == set()  # a CPU run takes no GPU slot
    h100 = load_recipe("toy", ["launch.gpu_type=H100"])
    assert pretrain_mod.gpu_tags(h100) == {"h100"}
    # the trainer's accelerator follows the recipe, not the shell's DS_ACCELERATOR=cpu
    assert pretrain_mod.launch_env(h100) == {"DS_ACCELERATOR": "cuda"}
    assert pretrain_mod.launch_env(load_recipe("tiny")) == {"DS_ACCELERATOR": "cpu"}

    @task(name="pretrain")
    def body(recipe: Recipe, *args: object) -> list[str]:
        """Stands in for the trainer: the wrapper and Prefect's engine are what is tested."""
        return sorted(TaskRunContext.get().task_run.tags)

    monkeypatch.setattr(pretrain_mod, "pretrain_task", body)

    @flow
    def calls(recipe: Recipe) -> tuple[list[str], str]:
        state = pretrain_mod.pretrain(recipe, "data", "vae", "hash", return_state=True)
        return state.result(), state.name

    tags, state = calls(h100)
    assert tags == ["h100"] and state == "Completed"
    assert calls(load_recipe("tiny"))[0] == []


def test_dvc_limit_is_created_and_serialises_across_repos(prefect_server, tmp_path) -> None:
    """Two DVC repos (so their file locks do not meet): only Prefect's `dvc` limit, which
    the first use creates on a server that lacks it, keeps their commands apart."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.delete_global_concurrency_limit_by_name(dvc_ops.DVC_LIMIT)
        except ObjectNotFound:
            pass
    spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    @task
    def hold(root: str) -> None:
        Path(root, ".dvc", "tmp").mkdir(parents=True, exist_ok=True)
        with dvc_ops.serialized(Path(root)):
            begin = time.monotonic()
            time.sleep(1.0)
            with lock:
                spans.append((begin, time.monotonic()))

    @flow
    def both() -> None:
        futures = [hold.submit(str(tmp_path / name)) for name in ("a", "b")]
        for future in futures:
            future.result()

    both()
    (a0, a1), (b0, b1) = sorted(spans)
    assert b0 >= a1, f"the two DVC sections overlapped: {spans}"
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(dvc_ops.DVC_LIMIT).limit == 1
