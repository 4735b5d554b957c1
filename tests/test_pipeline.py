"""The pipeline end to end on the tiny recipe, shortened: data -> vae -> pretrain, with the
MLflow parent run, the stage runs under it, the streamed losses, sample grids and a model."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

import mlflow
from lens import cli

SHORT = ["data.num_samples=64", "data.samples_per_shard=32", "vae.steps=4",
         "pretrain.steps=6", "pretrain.log_every=2", "pretrain.sample_every=3",
         "pretrain.ckpt_every=3"]


def test_tiny_pipeline_trains_and_tracks(prefect_server, dvc_repo: Path, capsys) -> None:
    args = ["run", "tiny", "--repo", str(dvc_repo), "--json",
            *sum((["--set", s] for s in SHORT), [])]
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = Path(out["model_dir"])
    assert (model / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert (model / "connector.safetensors").exists()
    assert json.loads((model / "lens.json").read_text())["step"] == 6

    client = mlflow.MlflowClient()
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["lens.model_dir"] == str(model)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {r.data.tags["lens.stage"] for r in children} == {"data", "vae", "pretrain"}
    pre = client.get_run(out["pretrain_run_id"])
    losses = client.get_metric_history(pre.info.run_id, "train/loss")
    assert [m.step for m in losses] == [2, 4, 6]
    assert pre.data.metrics["compute/flops_total"] > 0
    assert pre.data.tags["lens.dvc_hash"] == out["dvc_hash"]
    arts = {a.path for a in client.list_artifacts(pre.info.run_id, "samples")}
    assert arts == {"samples/step-00000003.png", "samples/step-00000006.png"}
    vae = [r for r in children if r.data.tags["lens.stage"] == "vae"][0]
    assert vae.data.metrics["vae/psnr"] > 0

    run_dir = Path(pre.data.tags["lens.last_checkpoint"]).parent.parent
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["final"]["steps"] == 6
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recipe["pretrain"]["steps"] == 6

    # The same job again (a retry, or a rerun): every stage is reused, and pretraining resumes
    # from its last checkpoint into the same MLflow run instead of starting over.
    assert cli.main(args) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["pretrain_run_id"] == out["pretrain_run_id"]
    assert again["dvc_hash"] == out["dvc_hash"] and again["vae_dir"] == out["vae_dir"]
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["final"]["steps"] == 6 and events[-1]["final"]["train_seconds"] < 5
    assert [m.step for m in client.get_metric_history(pre.info.run_id, "train/loss")] == [2, 4, 6]
