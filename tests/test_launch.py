"""Launch: in-process, torchrun and DeepSpeed commands, and the k8s / Slurm templates."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lens_model.recipe import load_recipe
from lens_model.train.launch import (
    deepspeed_cmd,
    deepspeed_hostfile,
    in_process,
    render,
    torchrun_cmd,
)
from tests.conftest import free_port, trainer_env

REPO = Path(__file__).resolve().parents[1]
K8S = dict(name="lens-pretrain", image="registry.example/lens:1.2", nnodes=3, nproc_per_node=8,
           script="scripts/pretrain.py", args=["--recipe", "lens-3.8b"])


def test_torchrun_cmd_is_a_static_rendezvous_per_node() -> None:
    cmd = torchrun_cmd(8, 2, 1, "10.0.0.1", 29501, "train.py", ["--steps", 5], python="python")
    assert cmd == ["python", "-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1",
                   "--nproc_per_node=8", "--master_addr=10.0.0.1", "--master_port=29501",
                   "train.py", "--steps", "5"]
    with pytest.raises(ValueError, match="node_rank 2"):
        torchrun_cmd(8, 2, 2, "10.0.0.1", 29501, "train.py")
    with pytest.raises(ValueError, match="nproc_per_node"):
        torchrun_cmd(0, 1, 0, "10.0.0.1", 29501, "train.py")
    with pytest.raises(ValueError, match="master_port"):
        torchrun_cmd(1, 1, 0, "10.0.0.1", 70000, "train.py")


def test_in_process_runs_the_script_as_main_and_restores_argv(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "job.py"
    script.write_text("import json, sys\nfrom pathlib import Path\n"
                      "Path(sys.argv[1]).write_text(json.dumps([__name__, sys.argv[2:]]))\n")
    argv = list(sys.argv)
    in_process(script, [tmp_path / "out.json", "--steps", 3])
    assert json.loads((tmp_path / "out.json").read_text()) == ["__main__", ["--steps", "3"]]
    assert sys.argv == argv
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2"):
        in_process(script, [])


def test_deepspeed_hostfile_and_command() -> None:
    assert deepspeed_hostfile({"node-0": 8, "node-1": 8}) == "node-0 slots=8\nnode-1 slots=8\n"
    for bad in ({}, {"node 0": 8}, {"node-0": 0}):
        with pytest.raises(ValueError):
            deepspeed_hostfile(bad)
    cmd = deepspeed_cmd("/etc/hostfile", "train.py", ["--x", "1"], master_addr="node-0",
                        python="python")
    assert cmd == ["python", "-m", "deepspeed.launcher.runner", "--hostfile=/etc/hostfile",
                   "--master_port=29500", "--launcher=pdsh", "--no_local_rank",
                   "--master_addr=node-0", "train.py", "--x", "1"]
    with pytest.raises(ValueError, match="needs master_addr"):
        deepspeed_cmd("/etc/hostfile", "train.py", node_rank=0)


@pytest.mark.slow
def test_deepspeed_launcher_runs_two_ranks_from_a_hostfile(tmp_path: Path) -> None:
    """The DeepSpeed launcher itself, on this host (no ssh): 2 ranks from a hostfile (~18 s)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(deepspeed_hostfile({"localhost": 2}))
    out = tmp_path / "out"
    cmd = deepspeed_cmd(hostfile, REPO / "tests" / "ds_worker.py",
                        ["--out", out, "--zero", "1", "--job", f"ds:{tmp_path / 'ckpt'}:3"],
                        master_addr="127.0.0.1", master_port=free_port(), node_rank=0)
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    states = [load_file(str(out / f"ds-rank{r}.safetensors")) for r in (0, 1)]
    infos = [json.loads((out / f"ds-rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world_size"] for i in infos] == [2, 2] and [i["step"] for i in infos] == [3, 3]
    for key, value in states[0].items():
        assert value.equal(states[1][key]), key


def test_render_k8s_pytorchjob() -> None:
    job = yaml.safe_load(render("k8s", **K8S, env={"LENS_RUN": "a b"}, pvc="lens-runs"))
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] + specs["Worker"]["replicas"] == 3
    for role in ("Master", "Worker"):
        pod = specs[role]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch" and container["image"] == K8S["image"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert container["command"] == [
            "python", "-m", "torch.distributed.run", "--nnodes=3", "--nproc_per_node=8",
            "--rdzv_backend=c10d", "--rdzv_endpoint=$(MASTER_ADDR):$(MASTER_PORT)",
            "--rdzv_id=lens-pretrain", "scripts/pretrain.py", "--recipe", "lens-3.8b"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["DS_ACCELERATOR"] == "cuda" and env["LENS_RUN"] == "a b"
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v]
        assert claims == ["lens-runs"]
    single = yaml.safe_load(render("k8s", **{**K8S, "nnodes": 1}))
    assert list(single["spec"]["pytorchReplicaSpecs"]) == ["Master"]


def test_render_takes_the_recipe_launch_section() -> None:
    launch = load_recipe("lens-3.8b").launch.model_dump()
    job = yaml.safe_load(render("k8s", **launch, name="lens-3-8b", script="train.py"))
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert master["image"] == launch["image"]
    assert f"--nnodes={launch['nnodes']}" in master["command"]
    assert master["resources"]["limits"]["nvidia.com/gpu"] == launch["nproc_per_node"]


def test_render_slurm_sbatch(tmp_path: Path) -> None:
    text = render("slurm", name="lens-pretrain", nnodes=16, nproc_per_node=8,
                  script="scripts/pretrain.py", args=["--set", "pretrain.lr=1e-4 x"],
                  partition="h100", time="48:00:00", image="reg/lens:1", container=True)
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for line in ("#SBATCH --nodes=16", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=h100",
                 "#SBATCH --time=48:00:00", "#SBATCH --job-name=lens-pretrain"):
        assert line in lines
    assert not any(line.startswith("#SBATCH --account") for line in lines)
    srun = shlex.split(text[text.index("\nsrun "):].replace("\\\n", " "))
    assert srun == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                    "--container-image=reg/lens:1", "python", "-m", "torch.distributed.run",
                    "--nnodes=16", "--nproc_per_node=8", "--rdzv_backend=c10d",
                    "--rdzv_endpoint=${MASTER_ADDR}:${MASTER_PORT}",
                    "--rdzv_id=${SLURM_JOB_ID}", "scripts/pretrain.py", "--set",
                    "pretrain.lr=1e-4 x"]
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in text
    assert "export DS_ACCELERATOR=cuda" in lines
    if shutil.which("bash"):
        script = tmp_path / "job.sbatch"
        script.write_text(text)
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("target,params,match", [
    ("ec2", K8S, "unknown"),
    ("k8s", {**K8S, "gpus": 8}, r"unknown parameter\(s\) \['gpus'\]"),
    ("k8s", {k: v for k, v in K8S.items() if k != "image"}, r"needs \['image'\]"),
    ("k8s", {**K8S, "name": "Lens_Pretrain"}, "DNS label"),
    ("k8s", {**K8S, "nnodes": 0}, "nnodes"),
    ("slurm", {**K8S, "partition": "a b"}, "one word"),
    ("slurm", {**K8S, "container": True, "image": None}, "needs image"),
])
def test_render_refuses_bad_parameters(target: str, params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render(target, **params)
