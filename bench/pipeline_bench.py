"""Orchestration overhead of the tiny pipeline: Prefect, MLflow and DVC time against the
stages' own compute.

    python -m bench.pipeline_bench [--set section.key=value ...] [--out FILE.json]

It runs ``lens run tiny`` in-process on a fresh ``LENS_HOME`` (a temporary folder) and a
fresh DVC repository, then a second time with nothing changed. Each stage reports its own
compute (data: rendering, the contract and the merge; vae: the training loop; pretrain: the
trainer process's lifetime, with MLflow streaming overlapping it; evaluate: generating and
verifying; register: saving the pipeline; 0 for a stage whose cache hit). Overhead is the
pipeline's wall time minus that compute. Target: <= 10% of the first run's wall time. The
rerun's wall time shows what a cached rerun costs.

The overhead splits into DVC (every `dvc` command the pipeline ran), MLflow (time inside
MLflow's tracking and registry clients, outside the trainer's lifetime, when losses stream
while the trainer computes) and the rest: Prefect's server, task and cache machinery, and
imports. MLflow and DVC calls made from parallel threads are summed, so the split is an upper
bound on their share.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import REPO, write_json
from lens_model import defaults


def _repo(root: Path) -> None:
    """A git + DVC repo with the project's dvc.yaml, params.yaml and data code."""
    from tasks.dataset import BUILD_CODE

    root.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for dep in BUILD_CODE:
        (root / dep).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (REPO / dep).is_dir() else shutil.copy
        copy(REPO / dep, root / dep)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                ["git", "add", "-A"],
                ["git", "-c", "user.email=b@b", "-c", "user.name=b", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)


class CallTimer:
    """Seconds spent inside wrapped functions; a call made from inside another is not counted
    twice. Calls made while ``paused`` is set (the trainer computing) count apart."""

    def __init__(self) -> None:
        self.seconds = {"counted": 0.0, "during_training": 0.0}
        self.paused = False
        self._local = threading.local()
        self._lock = threading.Lock()

    def reset(self) -> None:
        self.seconds = {k: 0.0 for k in self.seconds}

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if getattr(self._local, "depth", 0):
                return fn(*args, **kwargs)
            self._local.depth, start = 1, time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = 0
                with self._lock:
                    key = "during_training" if self.paused else "counted"
                    self.seconds[key] += time.perf_counter() - start
        return timed

    def wrap_class(self, cls: type) -> None:
        for name, attr in list(vars(cls).items()):
            if inspect.isfunction(attr) and not name.startswith("_"):  # plain methods only
                setattr(cls, name, self.wrap(attr))


def _instrument() -> tuple[CallTimer, CallTimer]:
    """Timers around MLflow's clients and the pipeline's `dvc` commands."""
    from mlflow.tracking._model_registry.client import ModelRegistryClient
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    import tasks.pretrain_stage
    from tasks import dvc_ops

    mlflow_t, dvc_t = CallTimer(), CallTimer()
    mlflow_t.wrap_class(TrackingServiceClient)
    mlflow_t.wrap_class(ModelRegistryClient)
    dvc_ops.dvc = dvc_t.wrap(dvc_ops.dvc)
    streaming = tasks.pretrain_stage.run_streaming

    def trainer_running(*args: Any, **kwargs: Any) -> Any:
        mlflow_t.paused = True
        try:
            return streaming(*args, **kwargs)
        finally:
            mlflow_t.paused = False
    tasks.pretrain_stage.run_streaming = trainer_running
    return mlflow_t, dvc_t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "pipeline_bench.json"))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lens-pipeline-bench-"))
    os.environ["LENS_HOME"] = str(work / "home")
    for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "LENS_DVC_REMOTE"):
        os.environ.pop(var, None)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".lens" / "torch_extensions"))
    defaults.apply()
    _repo(work / "repo")
    from flows.training_pipeline import run

    mlflow_t, dvc_t = _instrument()
    runs = []
    for label in ("first", "rerun"):
        mlflow_t.reset()
        dvc_t.reset()
        start = time.perf_counter()
        result = run("tiny", args.overrides, str(work / "repo"))
        wall = time.perf_counter() - start
        compute = sum(result["compute"].values())
        overhead = wall - compute
        split = {"dvc_s": dvc_t.seconds["counted"], "mlflow_s": mlflow_t.seconds["counted"]}
        split["prefect_and_rest_s"] = overhead - split["dvc_s"] - split["mlflow_s"]
        runs.append({"run": label, "wall_s": wall, "compute_s": compute,
                     "overhead_s": overhead, "overhead_fraction": overhead / wall,
                     "overhead_split_s": split,
                     "mlflow_during_training_s": mlflow_t.seconds["during_training"],
                     "stages_wall_s": result["stages"], "stages_compute_s": result["compute"],
                     "scores": result["scores"], "version": result["version"]})
        print(json.dumps(runs[-1], default=float), flush=True)
    out = {"benchmark": "pipeline_bench", "overrides": args.overrides, "runs": runs,
           "overhead_fraction": runs[0]["overhead_fraction"], "target": 0.10,
           "passed": runs[0]["overhead_fraction"] <= 0.10, "rerun_wall_s": runs[1]["wall_s"],
           "cpus": os.cpu_count()}
    write_json(args.out, out)
    split = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s"
                      for k, v in runs[0]["overhead_split_s"].items())
    print(f"overhead {out['overhead_fraction']:.1%} of {runs[0]['wall_s']:.0f} s (target 10%; "
          f"{split}); cached rerun {runs[1]['wall_s']:.1f} s -> {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
