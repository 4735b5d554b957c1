"""The pipeline end to end on the tiny recipe, shortened: data -> vae -> pretrain -> rl ->
reasoner -> search -> distill -> evaluate -> register -> promote, with the MLflow parent run,
the stage runs under it, the streamed losses, sample grids, registered models (the main and
the turbo one) that load and draw, and a cached rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import mlflow
from lens import cli
from tests.conftest import SHORT, PipelineRuns

LOAD = """
import io, sys
import mlflow, pandas as pd
from PIL import Image
model = mlflow.pyfunc.load_model("models:/lens-pipeline-test@candidate")
out = model.predict(pd.DataFrame({"prompt": ["a photo of a red circle"]}),
                    params={"steps": 2, "cfg": 3.0, "size": "48x24", "seed": 0})
print(Image.open(io.BytesIO(out["image"][0])).size)
print(bool(out["rewrite"][0]))
"""


def test_tiny_pipeline_trains_and_tracks(tiny_pipeline: PipelineRuns, capsys,
                                        tmp_path: Path) -> None:
    out = tiny_pipeline.first
    model = Path(out["model_dir"])
    assert (model / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    config = json.loads((model / "transformer" / "config.json").read_text())
    assert config["pooled_text"] is True  # the tiny recipe's model.pooled_text reached the model
    assert (model / "connector.safetensors").exists()
    lens_json = json.loads((model / "lens.json").read_text())
    assert lens_json["step"] == 2 and lens_json["rl"]["steps"] == 2  # the RL model
    assert Path(out["pretrained_dir"]).name == "final" and out["pretrained_dir"] != str(model)

    client = mlflow.MlflowClient()
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["lens.model_dir"] == str(model)
    # what a reviewer reads first: the report as its description, scores and recipe beside it
    assert parent.data.tags["mlflow.note.content"].startswith("# Lens pipeline: `tiny`")
    assert parent.data.metrics["eval/overall"] == out["scores"]["overall"]
    assert parent.data.params["pretrain.steps"] == "6" and "stage_seconds/rl" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {r.data.tags["lens.stage"] for r in children} == {
        "data", "vae", "pretrain", "rl_prompts", "rl", "reasoner", "reasoner-search", "distill",
        "evaluate", "register"}
    assert set(out["stages"]) == {"data", "vae", "pretrain", "rl", "reasoner", "search",
                                  "distill", "evaluate", "register", "promote"}
    assert set(out["scores"]) == set(out["baseline_scores"]) >= {"overall", "colors"}
    assert set(out["pretrained_scores"]) == set(out["scores"])  # the model RL started from
    rl_run = [r for r in children if r.data.tags["lens.stage"] == "rl"][0]
    assert rl_run.data.tags["lens.pretrain_run"] == out["pretrain_run_id"]
    assert rl_run.data.tags["lens.rl_prompts_dvc_hash"] == out["rl_prompts_dvc_hash"]
    assert rl_run.data.tags["lens.reward_hacking"] in ("true", "false")
    assert {"rl/reward", "rl/diversity", "gold/reward", "rubric/structural_integrity",
            "compute/flops_total", "loss/kl"} <= set(rl_run.data.metrics)
    assert [m.step for m in client.get_metric_history(rl_run.info.run_id, "gold/reward")] == [
        0, 1, 2]
    rl_arts = {a.path for a in client.list_artifacts(rl_run.info.run_id)}
    assert {"adapter", "samples"} <= rl_arts
    assert {a.path for a in client.list_artifacts(rl_run.info.run_id, "samples")} == {
        f"samples/gold-step-0000000{i}.png" for i in range(3)}
    assert rl_run.data.params["rl.lora_rank"] == "4"
    assert Path(out["eval_grid"]).is_file() and out["aliases"] == ["candidate", "champion"]
    ev = [r for r in children if r.data.tags["lens.stage"] == "evaluate"][0]
    assert ev.data.tags["lens.eval_hash"] == out["eval_hash"] and "eval/overall" in ev.data.metrics
    mv = client.get_model_version(out["model"], out["version"])
    assert mv.tags["lens.dvc_hash"] == out["dvc_hash"] and mv.tags["lens.eval_hash"]
    assert mv.tags["lens.run.pretrain"] == out["pretrain_run_id"] and "eval.colors" in mv.tags
    by_stage = {r.data.tags["lens.stage"]: r.info.run_id for r in children}
    assert {k.removeprefix("lens.run.") for k in mv.tags if k.startswith("lens.run.")} == {
        "data", "vae", "pretrain", "rl_prompts", "rl", "reasoner", "search", "distill",
        "evaluate"}
    assert mv.tags["lens.run.vae"] == by_stage["vae"] and mv.tags["lens.run.rl"] == by_stage["rl"]
    assert mv.tags["lens.rl_prompts_dvc_hash"] == out["rl_prompts_dvc_hash"]
    assert "DiffusionNFT" in mv.description and "before RL" in mv.description
    # The reasoner: trained and scored on held-out rules, its prompt searched and attached.
    reasoner_run = client.get_run(by_stage["reasoner"])
    assert {"heldout/exact", "heldout/rule/english", "reasoner/loss"} <= set(
        reasoner_run.data.metrics)
    assert [m.step for m in client.get_metric_history(by_stage["reasoner"], "reasoner/loss")] \
        == [0, 2, 3]
    search_run = client.get_run(by_stage["reasoner-search"])
    assert search_run.data.tags["system_prompt_hash"] == out["system_prompt_hash"]
    assert {"test/r/none/overall", "test/r/literal/overall", "test/r/seed/overall",
            "test/r/searched/overall",
            "test/plain/searched/overall", "test/r/searched/truncation_rate",
            "reasoner/rewrites", "reasoner/empty"} <= set(search_run.data.metrics)
    assert len(client.get_metric_history(by_stage["reasoner-search"], "search/best")) == 2
    candidates = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{by_stage['reasoner-search']}'")
    assert len(candidates) >= 2  # the seed and at least one edit
    seed = [c for c in candidates if c.data.tags["parent_candidate"] == ""]
    assert len(seed) == 1 and {"dev/overall", "dev/language"} <= set(seed[0].data.metrics)
    for cand in candidates:  # each carries its prompt, what it was made from, its failures
        assert {a.path for a in client.list_artifacts(cand.info.run_id)} >= {
            "system_prompt.txt", "failure_summary.txt", "failures.json"}
    assert all(c.data.tags["parent_candidate"] == seed[0].data.tags["system_prompt_hash"]
               for c in candidates if c is not seed[0])
    assert mv.tags["system_prompt_hash"] == out["system_prompt_hash"]
    assert mlflow.artifacts.load_text(f"runs:/{mv.run_id}/system_prompt.txt") == \
        mlflow.artifacts.load_text(f"runs:/{search_run.info.run_id}/system_prompt.txt")
    assert "## Reasoner" in mv.description and "eval_r.searched.overall" in mv.tags
    assert mv.tags["lens.run.reasoner"] == by_stage["reasoner"]
    assert mv.tags["lens.prefect_flow_run_id"] and mv.tags["lens.git_commit"]
    assert "Shapes-GenEval" in mv.description
    # The distilled student: its own run, scored beside the teacher, registered as -turbo.
    turbo = out["turbo"]
    assert turbo["model"] == "lens-pipeline-test-turbo" and turbo["steps"] == 4
    distill_run = client.get_run(by_stage["distill"])
    assert distill_run.data.tags["lens.teacher_run"] == by_stage["rl"]
    assert {"student/dmd", "critic/fake_loss", "critic/disc_loss", "compute/flops_total"} <= set(
        distill_run.data.metrics)
    assert {a.path for a in client.list_artifacts(by_stage["distill"], "samples")} == {
        "samples/turbo-step-00000000.png", "samples/turbo-step-00000002.png"}
    assert {"turbo/overall", "undistilled/overall", "turbo/speedup"} <= set(ev.data.metrics)
    assert ev.data.tags["lens.turbo_eval_hash"] == turbo["eval_hash"] != out["eval_hash"]
    tv = client.get_model_version(turbo["model"], turbo["version"])
    assert tv.tags["lens.teacher"] == f"{out['model']}/{out['version']}"
    assert float(tv.tags["lens.teacher_overall"]) == pytest.approx(out["scores"]["overall"],
                                                                   abs=1e-4)
    assert tv.tags["lens.eval_hash"] == turbo["eval_hash"] and "distilled from" in tv.description
    assert "min_teacher_share" in {c["gate"] for c in turbo["promotion"]["gates"]["checks"]}
    assert cli.main(["generate", "a photo of a red circle", "--model",
                     f"models:/{turbo['model']}/{turbo['version']}", "--size", "32x32",
                     "--out", str(tmp_path / "turbo"), "--json"]) == 0  # its own 4 steps
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"]) == 1
    reqs = Path(mlflow.pyfunc.get_model_dependencies(f"models:/{out['model']}/{out['version']}"))
    assert "lens-platform==0.1.0" in reqs.read_text().split()  # pinned, and no "+cpu" label
    assert "+" not in reqs.read_text()
    # the Prefect artifact: the summary table, linking the MLflow runs
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        arts = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["lens-pipeline-tiny"])))
    report = next((a.data for a in arts if f"/runs/{out['parent_run_id']}" in a.data), "")
    assert f"/runs/{out['pretrain_run_id']})" in report and "| evaluate |" in report
    # The registered pyfunc loads and draws in a fresh process with only the project installed.
    env = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-2:] == ["(48, 24)", "True"]
    # lens generate rewrites with the version's reasoner and says what it drew
    assert cli.main(["generate", "a photo of a red circle", "--model",
                     f"models:/{out['model']}/{out['version']}", "--steps", "2", "--size",
                     "32x32", "--out", str(tmp_path / "gen"), "--json"]) == 0
    gen = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(gen["rewrites"]) == 1 and len(gen["images"]) == 1
    # the search alone, for the registered version and with its own reasoner
    assert cli.main(["search", "tiny", "--model", f"models:/{out['model']}/{out['version']}",
                     "--json", *sum((["--set", s] for s in SHORT), [])]) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert alone["reasoner_dir"].endswith("/reasoner") and alone["hash"]
    assert set(alone["test"]) == {"r/none", "r/literal", "r/seed", "r/searched", "plain/none",
                                  "plain/searched"}
    pre = client.get_run(out["pretrain_run_id"])
    losses = client.get_metric_history(pre.info.run_id, "train/loss")
    assert [m.step for m in losses] == [2, 3, 4, 6]  # every log_every and sample step
    assert pre.data.metrics["compute/flops_total"] > 0
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        pre.data.metrics)  # psutil's system metrics, sampled while the trainer ran
    assert pre.data.tags["lens.dvc_hash"] == out["dvc_hash"]
    arts = {a.path for a in client.list_artifacts(pre.info.run_id, "samples")}
    assert arts == {"samples/step-00000003.png", "samples/step-00000006.png"}
    vae = [r for r in children if r.data.tags["lens.stage"] == "vae"][0]
    assert vae.data.metrics["vae/psnr"] > 0 and 0 <= ev.data.metrics["ceiling/overall"] <= 1

    last_ckpt = Path(pre.data.tags["lens.last_checkpoint"])  # tagged once written whole
    assert last_ckpt.name == "step-00000006" and (last_ckpt / "meta.json").is_file()
    run_dir = last_ckpt.parent.parent
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["final"]["steps"] == 6
    # the rerun did not launch the finished trainer again: one start, one end
    assert [e for e in events if "resumed_from" in e or "final" in e] == [events[0], events[-1]]
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recipe["pretrain"]["steps"] == 6

    # The same job again (a rerun): every stage is reused; the finished pretraining job is
    # found by its name and not relaunched (a killed one resumes: see the test below).
    again = tiny_pipeline.again
    assert again["pretrain_run_id"] == out["pretrain_run_id"]
    assert again["dvc_hash"] == out["dvc_hash"] and again["vae_dir"] == out["vae_dir"]
    # evaluation and registration are cached: the same scores and the same model version
    assert again["version"] == out["version"] and again["scores"] == out["scores"]
    assert again["turbo"]["version"] == turbo["version"]
    assert again["aliases"] == ["candidate", "champion"]

    # A reviewer compares the two pipeline runs: one by run id, one by NAME/VERSION.
    ref = f"{again['model']}/{again['version']}"
    assert cli.main(["compare", again["parent_run_id"], ref, "--json",
                     "--out", str(tmp_path / "cmp.png")]) == 0
    cmp = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cmp["a"]["parent_run_id"] == again["parent_run_id"]
    assert cmp["b"]["parent_run_id"] == out["parent_run_id"]  # the version's own run
    assert cmp["scores"]["eval/overall"][0] == cmp["scores"]["eval/overall"][1]
    assert "compute/flops_total" in cmp["compute"] and cmp["params_differ"] == {}
    assert cmp["system_prompt"]["hashes"] == [out["system_prompt_hash"]] * 2
    assert cmp["system_prompt"]["diff"] == [] and "test/r/searched/overall" in cmp["reasoner"]
    assert cmp["protocol"]["prompts_per_category"] == 2  # the grid used the runs' own protocol
    flows = cmp["lineage"]["lens.prefect_flow_run_id"]
    assert flows[0] != flows[1] and Path(cmp["grid"]).is_file()
    assert Path(cmp["grid"]).with_suffix(".txt").is_file()  # the legend: prompt and seed
    for bad, says in ((f"{again['model']}/99", "has no version '99'"),
                      ("0123456789abcdef", "no MLflow run '0123456789abcdef'")):
        assert cli.main(["compare", again["parent_run_id"], bad]) == 2
        assert says in capsys.readouterr().err
    history = client.get_metric_history(pre.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 3, 4, 6]


def test_a_failed_run_reports_where_it_stopped(prefect_server, dvc_repo: Path, capsys) -> None:
    """A contract failure in the data stage: exit 1, the parent run FAILED, and the Prefect
    artifact names the stage and the error."""
    args = ["run", "tiny", "--repo", str(dvc_repo), *sum((["--set", s] for s in SHORT), []),
            "--set", "data.contract.min_area=100000", "--set", "tracking.experiment=lens-fail"]
    assert cli.main(args) == 1
    assert "rejection_rate" in capsys.readouterr().err
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        arts = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["lens-pipeline-tiny"])))
    failed = [a.data for a in arts if "FAILED at `data`" in a.data]
    assert len(failed) == 1 and "ContractFailed" in failed[0] and "rejection_rate" in failed[0]
    exp = mlflow.get_experiment_by_name("lens-fail")
    parents = mlflow.search_runs([exp.experiment_id], "tags.`lens.stage` = 'pipeline'",
                                 output_format="list")
    assert [r.info.status for r in parents] == ["FAILED"]
    assert f"/runs/{parents[0].info.run_id})" in failed[0]


@pytest.mark.slow
def test_killed_mid_pretraining_resumes_from_its_last_checkpoint(prefect_server,
                                                                 dvc_repo: Path, capsys) -> None:
    """SIGKILL the whole `lens run` process group once a checkpoint exists; the rerun picks
    up that checkpoint (not step 0) and finishes the same MLflow run."""
    from prefect.settings import PREFECT_API_URL

    steps = ["pretrain.steps=40", "pretrain.ckpt_every=10", "pretrain.sample_every=100",
             "pretrain.log_every=5", "tracking.model_name=lens-kill-test"]
    overrides = [s for s in SHORT if not s.startswith(("pretrain.", "tracking."))] + steps
    args = ["run", "tiny", "--repo", str(dvc_repo), "--json",
            *sum((["--set", s] for s in overrides), [])]
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    proc = subprocess.Popen([sys.executable, "-m", "lens.cli", *args], start_new_session=True,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = Path(os.environ["LENS_HOME"]) / "runs"
    earlier = set(runs.glob("pretrain-tiny-*"))  # other tests' jobs share this LENS_HOME

    def checkpoints() -> list[Path]:
        return [c for c in runs.glob("pretrain-tiny-*/checkpoints/step-*")
                if c.parent.parent not in earlier]

    try:
        for _ in range(600):
            if checkpoints() or proc.poll() is not None:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "lens run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    run_dir = checkpoints()[0].parent.parent
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert "final" not in events[-1]  # killed before the end
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    job = mlflow.search_runs(search_all_experiments=True, output_format="list",
                             filter_string=f"tags.`lens.job` = '{run_dir.name}'")
    assert [r.info.run_id for r in job] == [out["pretrain_run_id"]]  # one run, resumed
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    starts = [(e["step"], Path(e["resumed_from"]).name) for e in events if "resumed_from" in e]
    assert starts[0] == (0, "") and starts[-1][0] >= 10, starts  # the rerun began at a checkpoint
    assert starts[-1][1] == f"step-{starts[-1][0]:08d}"
    assert events[-1]["final"]["steps"] == 40
