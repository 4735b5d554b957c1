"""Launching one training script four ways, from the same recipe-like parameters.

- ``in_process(script, args)``: here, as a one-rank world (the tiny recipe, tests, CPU);
- ``torchrun_cmd(...)``: ``python -m torch.distributed.run`` on one node or, with a static
  rendezvous on ``master_addr:master_port``, one command per node;
- ``deepspeed_hostfile(hosts)`` + ``deepspeed_cmd(hostfile, ...)``: DeepSpeed's launcher, which
  reaches the hosts over ssh/pdsh (or, with ``node_rank``, runs this node only, no ssh);
- ``render("k8s" | "slurm", ...)``: a Kubeflow PyTorchJob or a Slurm batch script from the
  Jinja2 templates in ``infra/templates``; both rendezvous (torchrun c10d) on the job's first
  node: the PyTorchJob's master service, or the first host of the Slurm allocation;
  ``render_job(recipe, stage, ...)`` fills it for one stage's training program.

The parameter names follow the recipe's ``launch`` section (nnodes, nproc_per_node,
master_addr, master_port, image). The training script reads its rank from the environment
(RANK, LOCAL_RANK, WORLD_SIZE), as :func:`lens_model.train.engine.init_distributed` does.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

if TYPE_CHECKING:
    from lens_model.recipe import Recipe

TEMPLATE_DIR = Path(os.environ.get("LENS_TEMPLATE_DIR")
                    or Path(__file__).resolve().parents[2] / "infra" / "templates")
TEMPLATES = {"k8s": "pytorchjob.yaml.tmpl", "slurm": "slurm.sbatch.tmpl"}
# What every GPU job exports: DeepSpeed on CUDA, its JIT ops cached in the container, NCCL
# errors raised rather than hung on, and no Hub access from training nodes.
DS_ENV = {
    "DS_ACCELERATOR": "cuda",
    "TORCH_EXTENSIONS_DIR": "/tmp/torch_extensions",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "HF_HUB_OFFLINE": "1",
}
_REQUIRED = {"k8s": ("name", "image", "nnodes", "nproc_per_node", "script"),
             "slurm": ("name", "nnodes", "nproc_per_node", "script")}
_OPTIONAL: dict[str, dict[str, Any]] = {
    "k8s": {"args": (), "env": {}, "master_port": 29500, "namespace": "default",
            "pvc": None, "mount_path": "/workspace/runs", "cpu": 8, "memory": "64Gi"},
    "slurm": {"args": (), "env": {}, "master_port": 29500, "partition": None,
              "account": None, "time": "24:00:00", "cpus_per_task": 16,
              "output": "%x-%j.out", "workdir": None, "image": None, "container": False},
}
# values that land unquoted in #SBATCH lines or YAML keys: one word each
_WORDS = ("name", "partition", "account", "time", "output", "workdir", "image")
# recipe ``launch`` keys the cluster decides for itself: accepted, not used
_CLUSTER_DECIDES = ("master_addr", "device", "gpu_type")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


def _port(port: int) -> None:
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"master_port must be in 1..65535, got {port!r}")


def in_process(script: str | Path, args: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``script`` as ``__main__`` in this process with ``args`` (a one-rank world)."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1":
        raise RuntimeError(f"WORLD_SIZE={world} is set: this process belongs to a launcher's "
                           f"group; run the script through that launcher, not in_process")
    path = Path(script)
    if not path.is_file():
        raise FileNotFoundError(f"training script {path} does not exist")
    saved = sys.argv
    sys.argv = [str(path), *map(str, args)]
    try:
        return runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = saved


def torchrun_cmd(nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
                 master_addr: str = "127.0.0.1", master_port: int = 29500,
                 script: str | Path = "", args: Sequence[str] = (),
                 python: str = sys.executable) -> list[str]:
    """``torch.distributed.run`` for node ``node_rank`` of ``nnodes`` (static rendezvous)."""
    _positive(nproc_per_node=nproc_per_node, nnodes=nnodes)
    _port(master_port)
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"node_rank {node_rank} is not in [0, nnodes={nnodes})")
    if not str(script):
        raise ValueError("torchrun_cmd needs the training script's path")
    return [python, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
            f"--node_rank={node_rank}", f"--nproc_per_node={nproc_per_node}",
            f"--master_addr={master_addr}", f"--master_port={master_port}",
            str(script), *map(str, args)]


def deepspeed_hostfile(hosts: dict[str, int]) -> str:
    """DeepSpeed hostfile text: one ``host slots=N`` line per host (N GPUs there)."""
    if not hosts:
        raise ValueError("deepspeed_hostfile needs at least one host, e.g. {'node-0': 8}")
    lines = []
    for host, slots in hosts.items():
        if not host or any(c.isspace() for c in host) or host.startswith("#"):
            raise ValueError(f"host name {host!r} must be non-empty, without spaces or '#'")
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"host {host!r}: slots must be a whole number >= 1, got {slots!r}")
        lines.append(f"{host} slots={slots}")
    return "\n".join(lines) + "\n"


def deepspeed_cmd(hostfile: str | Path, script: str | Path, args: Sequence[str] = (),
                  master_addr: str | None = None, master_port: int = 29500,
                  launcher: str = "pdsh", node_rank: int | None = None,
                  python: str = sys.executable) -> list[str]:
    """DeepSpeed's launcher over ``hostfile``; with ``node_rank`` it starts this node only.

    ``--no_local_rank``: the script reads LOCAL_RANK from the environment, not its argv.
    """
    _port(master_port)
    cmd = [python, "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}",
           f"--master_port={master_port}", f"--launcher={launcher}", "--no_local_rank"]
    if master_addr:
        cmd.append(f"--master_addr={master_addr}")
    if node_rank is not None:
        if node_rank < 0:
            raise ValueError(f"node_rank must be >= 0, got {node_rank}")
        if not master_addr:
            raise ValueError("deepspeed_cmd with node_rank (no ssh) needs master_addr")
        cmd += ["--no_ssh", f"--node_rank={node_rank}"]
    return [*cmd, str(script), *map(str, args)]


def rendezvous_torchrun(nnodes: int, nproc_per_node: int, endpoint: str, job_id: str,
                        script: str | Path, args: Sequence[str] = ()) -> list[str]:
    """torchrun with c10d rendezvous at ``endpoint``: every node runs the same command."""
    return ["python", "-m", "torch.distributed.run", f"--nnodes={nnodes}",
            f"--nproc_per_node={nproc_per_node}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={endpoint}", f"--rdzv_id={job_id}", str(script),
            *map(str, args)]


def _params(target: str, params: dict[str, Any]) -> dict[str, Any]:
    """Check ``params`` for ``target`` and fill defaults."""
    if target not in TEMPLATES:
        raise ValueError(f"render target {target!r} is unknown; use one of {sorted(TEMPLATES)}")
    optional, required = _OPTIONAL[target], _REQUIRED[target]
    unknown = sorted(set(params) - set(required) - set(optional) - set(_CLUSTER_DECIDES))
    if unknown:
        raise ValueError(f"render({target!r}): unknown parameter(s) {unknown}; allowed: "
                         f"{sorted([*required, *optional])}")
    missing = [k for k in required if params.get(k) in (None, "")]
    if missing:
        raise ValueError(f"render({target!r}) needs {missing}")
    out = {**optional, **{k: v for k, v in params.items() if k not in _CLUSTER_DECIDES}}
    _positive(nnodes=out["nnodes"], nproc_per_node=out["nproc_per_node"])
    _port(out["master_port"])
    for key in _WORDS:
        value = out.get(key)
        if value is not None and (not str(value) or any(c.isspace() for c in str(value))):
            raise ValueError(f"{key} {value!r} must be one word without spaces or newlines")
    if target == "k8s" and not _DNS_LABEL.match(out["name"]):
        raise ValueError(f"job name {out['name']!r} must be a DNS label for Kubernetes: "
                         f"lowercase letters, digits and '-', at most 63 characters")
    if target == "slurm" and out["container"] and not out["image"]:
        raise ValueError("render('slurm', container=True) needs image (run through pyxis)")
    if not isinstance(out["env"], dict):
        raise ValueError(f"env must be a dict of NAME: value, got {type(out['env']).__name__}")
    out["env"] = {**DS_ENV, **{str(k): str(v) for k, v in out["env"].items()}}
    out["args"] = [str(a) for a in out["args"]]
    return out


def render(target: str, **params: Any) -> str:
    """Fill ``infra/templates`` for ``target`` ("k8s" or "slurm") with ``params``."""
    p = _params(target, params)
    if target == "k8s":
        # kubelet expands $(VAR) from the env the training operator injects into the pod
        p["command"] = rendezvous_torchrun(p["nnodes"], p["nproc_per_node"],
                                           "$(MASTER_ADDR):$(MASTER_PORT)", p["name"],
                                           p["script"], p["args"])
    else:
        p["script_and_args"] = shlex.join([str(p["script"]), *p["args"]])
        p["env_exports"] = [f"export {k}={shlex.quote(v)}" for k, v in p["env"].items()]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    return env.get_template(TEMPLATES[target]).render(**p)


def render_job(recipe: Recipe, stage: str, target: str, *, mount: str = "/workspace/runs",
               pvc: str | None = "lens-runs", dataset: str = "data/dataset",
               vae: str | None = None, model: str | None = None,
               prompts: str = "data/rl_prompts/prompts.parquet") -> tuple[str, str, str]:
    """One stage's cluster job (``target`` "k8s" or "slurm"): ``(name, run dir, text)``. The
    run dir on the shared volume ``mount`` is named for the stage, recipe and its hash, so the
    rl job finds pretraining's final/, distill the rl job's, and a second pretraining stage
    (``pretrain.init_from``) the first's; ``model`` overrides that."""
    slug = recipe.name.replace(".", "-")
    pretrain_run = f"{mount}/pretrain-{slug}-{recipe.hash()}"
    launch = recipe.launch
    if stage in ("rl", "distill"):
        name = f"{stage}-{slug}-{recipe.hash()}"
        run = f"{mount}/{name}"
        if stage == "rl":
            nnodes = recipe.rl.nnodes or launch.nnodes
            inputs = ["--model", model or f"{pretrain_run}/final", "--prompts", prompts]
        else:  # the teacher is the RL job's model; the features are pretraining's cache
            nnodes = launch.nnodes
            inputs = ["--model", model or f"{mount}/rl-{slug}-{recipe.hash()}/final",
                      "--dataset", dataset, "--features", f"{mount}/features"]
        script_args = ["--params", f"{run}/recipe.yaml", *inputs, "--run-dir", run]
    elif stage == "pretrain":
        name, run, nnodes = pretrain_run.rsplit("/", 1)[-1], pretrain_run, launch.nnodes
        script_args = ["--params", f"{run}/recipe.yaml", "--dataset", dataset,
                       "--vae", vae or recipe.vae.path or f"{run}/vae", "--run-dir", run]
        if recipe.pretrain.init_from:  # stage 2: render and run the first stage's job first
            from lens_model.recipe import load_recipe

            first = load_recipe(recipe.pretrain.init_from)
            script_args += ["--init", model or f"{mount}/pretrain-"
                            f"{first.name.replace('.', '-')}-{first.hash()}/final"]
    else:
        raise ValueError(f"stage {stage!r} has no training program; use pretrain, rl or "
                         f"distill")
    params: dict[str, Any] = {"name": name, "nnodes": nnodes,
                              "nproc_per_node": launch.nproc_per_node,
                              "master_port": launch.master_port,
                              "script": f"lens_model/train/{stage}.py", "args": script_args}
    if target == "k8s":
        params |= {"image": launch.image, "mount_path": mount, "pvc": pvc}
    return name, run, render(target, **params)
