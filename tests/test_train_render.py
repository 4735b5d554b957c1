"""`lens train render`: cluster jobs for pretraining from one recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lens import cli


def test_render_k8s_and_slurm(tmp_path: Path, capsys) -> None:
    assert cli.main(["train", "render", "lens-3.8b", "--target", "k8s",
                     "--out", str(tmp_path / "k8s")]) == 0
    job_file = next((tmp_path / "k8s").glob("pretrain-*.yaml"))
    job = next(d for d in yaml.safe_load_all(job_file.read_text()) if d)
    specs = job["spec"]["pytorchReplicaSpecs"]
    workers = specs.get("Worker", {}).get("replicas", 0)
    assert specs["Master"]["replicas"] + workers == 16  # 16 nodes x 8 GPUs, as the recipe says
    container = specs["Master"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert "lens_model/train/pretrain.py" in container["command"]
    assert (tmp_path / "k8s" / "recipe.yaml").exists()

    assert cli.main(["train", "render", "tiny", "--target", "slurm",
                     "--set", "launch.nnodes=2", "--set", "launch.nproc_per_node=4"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in script and "--nproc_per_node=4" in script
    with pytest.raises(SystemExit):  # argparse: --target must be k8s or slurm
        cli.main(["train", "render", "tiny", "--target", "nomad"])


def test_render_the_rl_stage_on_its_own_node_count(tmp_path: Path) -> None:
    """lens-3.8b's RL runs on 64 GPUs (rl.nnodes 8), from the pretrain job's final model."""
    assert cli.main(["train", "render", "lens-3.8b", "--stage", "rl", "--target", "k8s",
                     "--out", str(tmp_path)]) == 0
    job_file = next(tmp_path.glob("rl-*.yaml"))
    job = next(d for d in yaml.safe_load_all(job_file.read_text()) if d)
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] + specs.get("Worker", {}).get("replicas", 0) == 8
    command = specs["Master"]["template"]["spec"]["containers"][0]["command"]
    assert "lens_model/train/rl.py" in command
    model = command[command.index("--model") + 1]
    assert model.startswith("/workspace/runs/pretrain-lens-3-8b-") and model.endswith("/final")
    assert command[command.index("--prompts") + 1] == "data/rl_prompts/prompts.parquet"


def test_render_the_distill_stage_from_the_rl_model(tmp_path: Path) -> None:
    """The turbo job distils the rl job's model, reading pretraining's feature cache."""
    assert cli.main(["train", "render", "lens-3.8b", "--stage", "distill", "--target", "slurm",
                     "--out", str(tmp_path)]) == 0
    script = next(tmp_path.glob("distill-*.sbatch")).read_text()
    assert "lens_model/train/distill.py" in script
    assert "--model /workspace/runs/rl-lens-3-8b-" in script
    assert "--features /workspace/runs/features" in script


def test_render_the_second_pretraining_stage_from_the_first(tmp_path: Path) -> None:
    """lens-3.8b's pretraining starts from lens-3.8b-512's final/, which its job names."""
    from lens_model.recipe import load_recipe

    first = load_recipe("lens-3.8b-512")
    assert cli.main(["train", "render", "lens-3.8b", "--target", "slurm",
                     "--out", str(tmp_path)]) == 0
    script = next(tmp_path.glob("pretrain-*")).read_text()
    assert f"--init /workspace/runs/pretrain-lens-3-8b-512-{first.hash()}/final" in script
    assert cli.main(["train", "render", "lens-3.8b-512", "--target", "slurm",
                     "--out", str(tmp_path / "one")]) == 0
    assert "--init" not in next((tmp_path / "one").glob("pretrain-*")).read_text()
