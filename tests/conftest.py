"""Test isolation: every test session gets its own LENS_HOME, Prefect home and MLflow store."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_SESSION = Path(tempfile.mkdtemp(prefix="lens-tests-"))
for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "LENS_DVC_REMOTE", "LENS_DVC_REPO"):
    os.environ.pop(var, None)  # tests never touch a user's servers
os.environ["LENS_HOME"] = str(_SESSION / "home")
# DeepSpeed's JIT-built op is pure build output: keep it under the checkout's .lens/ so each
# session does not pay the ~30 s build again.
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      str(Path(__file__).resolve().parents[1] / ".lens" / "torch_extensions"))

from lens_model import defaults  # noqa: E402  (the environment above must be set first)

defaults.apply()
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def prefect_server():
    """Prefect's own test server, once per session (about 7 s to start on a quiet host)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # a busy 2-core host can need >60 s
        yield


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run a command with the venv's tools first on PATH; fail with its output shown."""
    full_env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **env}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    """A fresh git + DVC repo holding the project's dvc.yaml and params.yaml."""
    return make_dvc_repo(tmp_path / "repo")


def make_dvc_repo(root: Path) -> Path:
    """:func:`dvc_repo`'s repo, at ``root``."""
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    # dvc.yaml's code deps, so `dvc status` can hash them
    from tasks.dataset import BUILD_CODE
    from tasks.rl_prompts import RL_PROMPTS_CODE

    for dep in {*BUILD_CODE, *RL_PROMPTS_CODE, "configs/taxonomy"}:
        (root / dep).parent.mkdir(parents=True, exist_ok=True)
        if (REPO / dep).is_dir():
            shutil.copytree(REPO / dep, root / dep, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / dep, root / dep)
    run(["git", "init", "-q"], root)
    run([sys.executable, "-m", "dvc", "init", "-q"], root)
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], root)
    return root


@pytest.fixture(autouse=True)
def _log_handlers_on_a_live_stream() -> Iterator[None]:
    """Prefect builds its log handlers once per process, on the sys.stderr of that moment;
    under pytest's capture that stream closes with the test, and the next in-process flow
    would fail writing its first log line. Point such handlers back at the real stderr."""
    yield
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for handler in (h for lg in loggers for h in getattr(lg, "handlers", [])):
        if not isinstance(handler, logging.StreamHandler):
            continue
        if getattr(handler.stream, "closed", False):
            handler.stream = sys.__stderr__  # setStream would flush the closed one
        console = getattr(handler, "console", None)  # Prefect's rich console keeps its own
        if console is not None and getattr(console.file, "closed", False):
            console.file = sys.__stderr__


def trainer_env() -> dict[str, str]:
    """The environment for a training process this test starts: DeepSpeed on the CPU, one
    thread, and none of the pytest process's own distributed settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def program_events(program: str, args: list[str], run: Path, nproc: int = 1) -> list[dict]:
    """Run ``lens_model/train/<program>.py`` on the CPU to the end; the events it wrote in
    ``run``. One process runs in this one, through the program's ``main`` on one thread, as a
    process of its own would (which would spend longer importing torch, diffusers and
    DeepSpeed than training a few steps). More go through torchrun on a free port."""
    if nproc > 1:
        from lens_model.train.launch import torchrun_cmd

        cmd = torchrun_cmd(nproc, script=REPO / "lens_model" / "train" / f"{program}.py",
                           args=args, master_port=free_port())
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env=trainer_env())
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    else:
        import torch

        threads = torch.get_num_threads()  # the program sets its own; later tests keep theirs
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("OMP_NUM_THREADS", "1")  # as trainer_env gives a process
                assert importlib.import_module(f"lens_model.train.{program}").main(args) == 0
        finally:
            torch.set_num_threads(threads)
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def straight_and_resumed(run_events: Callable[[Path], list[dict]],
                         root: Path) -> tuple[list[dict], list[dict]]:
    """A 4-step training program run straight (checkpoints at steps 2 and 4), then again on a
    copy of its step-2 checkpoint alone, what a kill right after that checkpoint leaves;
    ``run_events(run_dir)`` runs it and returns its events. Both event lists."""
    straight = run_events(root / "straight")
    ckpts = root / "straight" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000004"]
    shutil.copytree(ckpts / "step-00000002", root / "resumed" / "checkpoints" / "step-00000002")
    resumed = run_events(root / "resumed")
    assert resumed[0]["resumed_from"].endswith("step-00000002")
    return straight, resumed


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BRIEF = ["data.num_samples=512", "data.samples_per_shard=256", "vae.steps=200",
         "pretrain.steps=600", "pretrain.sample_every=1000", "pretrain.ckpt_every=1000",
         "pretrain.log_every=100", "tracking.experiment=lens-brief"]


@dataclass(frozen=True)
class BriefTeacher:
    model: str  # a training final/
    data: Path  # its validated dataset; its features are under LENS_HOME/features


@pytest.fixture(scope="session")
def brief_teacher(prefect_server, tmp_path_factory) -> BriefTeacher:
    """A tiny model trained briefly by the pipeline's own VAE and pretrain stages, once per
    session: the RL and the distillation mechanism tests start from it."""
    from prefect import flow

    from lens_model.recipe import load_recipe
    from tasks import dataset
    from tasks.pretrain_stage import pretrain
    from tasks.vae_stage import vae_stage

    root = tmp_path_factory.mktemp("brief")
    recipe = load_recipe("tiny", BRIEF)
    dataset.prepare_all(recipe, root / "raw")
    dataset.validate_all(recipe, root / "raw", root / "data")

    @flow
    def brief() -> str:
        vae = vae_stage(recipe, str(root / "data"), "brief")
        return pretrain(recipe, str(root / "data"), vae.dir, "brief").model_dir

    return BriefTeacher(brief(), root / "data")


# The tiny recipe at its shortest that still runs, tracks and registers every stage.
SHORT = ["data.num_samples=64", "data.samples_per_shard=32", "vae.steps=4",
         "pretrain.steps=6", "pretrain.log_every=2", "pretrain.sample_every=3",
         "pretrain.ckpt_every=3", "rl.num_prompts=24", "rl.steps=2", "rl.groups=2",
         "rl.group_size=2", "rl.sample_steps=2", "rl.gold_prompts=2", "rl.gold_every=1",
         "rl.lora_rank=4", "rl.lora_alpha=8", "reasoner.steps=4", "reasoner.train_batch=2",
         "reasoner.log_every=2", "reasoner.heldout_examples=9", "reasoner.max_new_tokens=24",
         "reasoner.search.dev_per_category=1", "reasoner.search.candidates_per_round=2",
         "reasoner.search.patience=1", "reasoner.search.max_rounds=1",
         "reasoner.search.test_per_category=1", "distill.steps=2", "distill.batch=2",
         "distill.ttur=1", "distill.num_samples=8", "distill.log_every=1",
         "eval.prompts_per_category=2",
         "gates.min_overall=0",
         "gates.max_latency_s=60", "tracking.model_name=lens-pipeline-test"]


@dataclass(frozen=True)
class PipelineRuns:
    args: list[str]  # the `lens run` command line, SHORT in a fresh DVC repo
    first: dict  # its --json result
    again: dict  # the same command once more: every stage reused


def lens_json(args: list[str]) -> dict:
    """Run the ``lens`` CLI in this process; its --json result (the last line it prints)."""
    from lens import cli

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(args)
    assert code == 0, f"lens {' '.join(args)} exited {code}"
    return json.loads(printed.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tiny_pipeline(prefect_server, tmp_path_factory) -> PipelineRuns:
    """The shortened tiny pipeline run twice, once per session: the pipeline test checks what
    it trained and tracked, the browser test what MLflow's UI shows of it."""
    repo = make_dvc_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    args = ["run", "tiny", "--repo", str(repo), "--json", *sum((["--set", s] for s in SHORT), [])]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # it trains briefly
        first = lens_json(args)
        return PipelineRuns(args, first, lens_json(args))
