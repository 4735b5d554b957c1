"""The training and GPU benchmark scripts run end to end on CPU and write the JSON they promise."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flows.training_pipeline import STAGES

REPO = Path(__file__).resolve().parents[1]

GPU_TRAIN_KEYS = {
    "device", "torch", "cuda", "peak_tflops", "benchmark", "smoke", "preset", "blocks",
    "blocks_full", "params", "precision", "optimizer", "grad_checkpointing", "sdpa_backend",
    "batch", "resolution", "image_tokens", "text_tokens", "warmup_steps", "steps",
    "ms_per_step", "ms_per_step_mean", "ms_fwd_bwd", "ms_optimizer", "forward_flops",
    "model_flops_per_step", "hardware_flops_per_step", "achieved_tflops",
    "achieved_tflops_hardware", "mfu", "hfu", "mfu_fwd_bwd", "peak_memory_gib", "final_loss",
}
GPU_INFER_KEYS = {
    "device", "torch", "cuda", "peak_tflops", "benchmark", "smoke", "preset", "blocks", "params",
    "dtype", "sdpa_backend", "resolution", "image_tokens", "text_tokens", "warmup", "iters",
    "eager", "compiled", "reference", "within_target", "speedup_vs_diffusers_sd3_batch_1",
    "estimate_20_step_cfg_s", "estimate_turbo_4_step_s",
}
LOOP_KEYS = {"steps", "seconds", "samples_per_s", "tokens_per_s", "step_ms_median",
             "samples_per_s_by_round", "final_loss"}


def _env() -> dict[str, str]:
    """DeepSpeed on CPU, its JIT-built op cached where the project keeps it."""
    ext = os.environ.get("TORCH_EXTENSIONS_DIR") or str(REPO / ".lens" / "torch_extensions")
    return {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": ext,
            "HF_HUB_OFFLINE": "1"}


def _bench(name: str) -> list[str]:
    """The command that runs ``bench/NAME.py`` as a module (from the repository root)."""
    return [sys.executable, "-m", f"bench.{name}"]


def _run(name: str, out: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run([*_bench(name), *args, "--out", str(out)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def _positive(*values: Any) -> None:
    for v in values:
        assert isinstance(v, int | float) and math.isfinite(v) and v > 0, v


# slow: 45 s of two training runs; the engine and pretrain tests cover the trainer in the
# default run, this checks the bench's comparison (make test-all)
@pytest.mark.slow
def test_train_bench_compares_deepspeed_with_plain_pytorch(tmp_path: Path) -> None:
    got = _run("train_bench", tmp_path / "train.json", "--steps", "2", "--warmup", "1",
               "--rounds", "1", "--samples", "4", "--text-tokens", "24", "--threads", "1")
    assert got["machine"]["torch_threads"] == 1
    assert got["data"]["samples_per_step"] == 4 and got["data"]["image_tokens_per_sample"] == 64
    for name in ("plain", "deepspeed"):
        loop = got[name]
        assert LOOP_KEYS <= loop.keys()
        assert loop["steps"] == 2
        _positive(loop["seconds"], loop["samples_per_s"], loop["tokens_per_s"],
                  loop["step_ms_median"], loop["final_loss"])
        # tokens/s counts real image + text tokens: 4 x 64 image plus ~4 x 24 text per step
        ratio = loop["tokens_per_s"] / loop["samples_per_s"]
        assert 64 + 20 < ratio < 64 + 28
    expected = (got["plain"]["samples_per_s"] / got["deepspeed"]["samples_per_s"] - 1) * 100
    assert got["overhead_pct"] == pytest.approx(expected, abs=0.01)
    assert got["target_overhead_pct"] == 15.0
    assert got["within_target"] == (got["overhead_pct"] <= 15.0)
    assert got["settings"]["zero_stage"] == 0 and got["settings"]["precision"] == "fp32"


REAL_KEYS = {
    "device", "torch", "cuda", "peak_tflops", "recipe", "blocks", "blocks_full", "params",
    "precision", "zero_stage", "ema", "ema_device", "grad_checkpointing", "attention",
    "buckets", "token_budget", "text_tokens_per_sample", "warmup_steps", "steps",
    "ms_per_step", "samples_per_step", "image_tokens_per_step", "achieved_tflops", "mfu",
    "peak_memory_gib", "final_loss", "seconds",
}
PIPELINE_KEYS = {
    "device", "torch", "cuda", "peak_tflops", "recipe", "size", "steps", "guidance_scale",
    "dtype", "prompt_words", "prompt_tokens", "lm_params", "eager", "compiled",
    "within_target", "peak_memory_gib", "seconds",
}


def test_gpu_suite_smoke_writes_both_benchmarks_into_one_file(tmp_path: Path) -> None:
    """The suite the GPU session runs, on CPU: pretraining's own step (Trainer + LossFn on
    packed mixed-bucket rows) beside the ideal one, the backbone forward and LensPipeline,
    eager and compiled, all in one JSON file that names the commit."""
    out = tmp_path / "suite.json"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--smoke", "--out",
                           str(out)], cwd=REPO, env={**_env(), "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    suite = json.loads(out.read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    assert suite["smoke"] is True and suite["commit"] == head
    assert {n: p["exit"] for n, p in suite["parts"].items()} == {"gpu_train": 0, "gpu_infer": 0}
    train = suite["parts"]["gpu_train"]["result"]
    for part, buckets in (("real", 16), ("real_square", 1)):
        real = train[part]
        assert set(real) == REAL_KEYS and real["buckets"] == buckets and real["steps"] == 2
        assert real["recipe"] == "tiny" and real["ema"] is True and real["mfu"] is None
        assert real["samples_per_step"] > 1  # packed rows: many images share one row
        assert real["image_tokens_per_step"] <= real["token_budget"] == 1024
        _positive(real["ms_per_step"], real["achieved_tflops"], real["final_loss"])
    ideal = train["ideal"]
    assert set(ideal) == GPU_TRAIN_KEYS | {"seconds"} and ideal["image_tokens"] == 25
    assert ideal["hardware_flops_per_step"] == pytest.approx(4 / 3 * ideal["model_flops_per_step"])
    _positive(ideal["ms_per_step"], ideal["ms_fwd_bwd"], ideal["ms_optimizer"])
    infer = suite["parts"]["gpu_infer"]["result"]
    forward = infer["forward"]
    assert set(forward) == GPU_INFER_KEYS | {"seconds"} and forward["within_target"] is None
    for mode in ("eager", "compiled"):
        for row in forward[mode].values():
            _positive(row["ms_per_forward"], row["achieved_tflops"])
    pipe = infer["pipeline"]
    assert set(pipe) == PIPELINE_KEYS and pipe["prompt_words"] == 109 and pipe["steps"] == 20
    _positive(pipe["prompt_tokens"], pipe["lm_params"], pipe["eager"]["s_per_image"],
              pipe["compiled"]["s_per_image"])


def test_gpu_train_refuses_a_block_count_the_preset_lacks(tmp_path: Path) -> None:
    proc = subprocess.run([*_bench("gpu_train"), "--smoke", "--parts", "ideal",
                           "--blocks", "9", "--out", str(tmp_path / "x.json")], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--blocks 9 is outside 1..4" in proc.stderr


SHORT_PIPELINE = ["data.num_samples=64", "data.samples_per_shard=32", "vae.steps=4",
                  "pretrain.steps=6", "pretrain.sample_every=3", "pretrain.ckpt_every=3",
                  "eval.prompts_per_category=1", "gates.max_latency_s=60"]


@pytest.mark.slow
def test_pipeline_bench_splits_wall_time_into_compute_and_overhead(tmp_path: Path) -> None:
    args = sum((["--set", s] for s in SHORT_PIPELINE), [])
    proc = subprocess.run([*_bench("pipeline_bench"), *args,
                           "--out", str(tmp_path / "p.json")], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "p.json").read_text())
    first, rerun = got["runs"]
    assert set(first["stages_compute_s"]) == set(STAGES)
    assert 0 < first["compute_s"] < first["wall_s"] and 0 < got["overhead_fraction"] < 1
    split = first["overhead_split_s"]
    assert split["dvc_s"] > 0 and split["mlflow_s"] > 0  # dvc commit + push; runs, models
    assert sum(split.values()) == pytest.approx(first["overhead_s"])
    assert first["mlflow_during_training_s"] > 0  # the losses streamed while it trained
    # the rerun's cached stages did no work of their own
    assert rerun["stages_compute_s"]["vae"] == rerun["stages_compute_s"]["evaluate"] == 0
    assert rerun["version"] == first["version"]


@pytest.mark.slow
def test_learning_bench_scores_every_snapshot_against_compute(tmp_path: Path,
                                                              dvc_repo: Path) -> None:
    args = sum((["--set", s] for s in SHORT_PIPELINE), [])
    proc = subprocess.run([*_bench("learning_bench"),
                           "--recipe", "tiny", *args, "--repo", str(dvc_repo),
                           "--out", str(tmp_path / "l.json")], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "l.json").read_text())
    assert [p["step"] for p in got["points"]] == [0, 3, 6]  # untrained, then each snapshot
    assert got["points"][1]["flops"] > 0 and got["points"][2]["flops"] > got["points"][1]["flops"]
    assert all("overall" in p["scores"] for p in got["points"])
    # --run-dir rescores the same run's snapshots without training: the same points
    again = subprocess.run([*_bench("learning_bench"),
                            "--recipe", "tiny", *args, "--run-dir", got["run_dir"],
                            "--out", str(tmp_path / "again.json")], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rescored = json.loads((tmp_path / "again.json").read_text())
    assert rescored["pipeline_s"] is None
    assert [(p["step"], p["scores"]) for p in rescored["points"]] == [
        (p["step"], p["scores"]) for p in got["points"]]


@pytest.mark.parametrize(("argv", "match"), [
    (["--long-only"], "--long-only runs the long-caption model alone: give"),
    (["--long-caption-prob", "0"], "--long-caption-prob 0.0: give a share in"),
])
def test_reasoner_bench_refuses_bad_arguments(argv: list[str], match: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from bench import reasoner_bench

    with pytest.raises(SystemExit) as exit_:
        reasoner_bench.main(argv)
    assert exit_.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.slow
def test_reasoner_bench_reports_the_searched_prompt_on_the_test_split(tmp_path: Path,
                                                                      dvc_repo: Path) -> None:
    from tests.conftest import SHORT

    args = sum((["--set", s] for s in SHORT), [])
    proc = subprocess.run([*_bench("reasoner_bench"),
                           "--recipe", "tiny", *args, "--repo", str(dvc_repo),
                           "--long-caption-prob", "0.5", "--out", str(tmp_path / "r.json")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "r.json").read_text())
    model = got["model"]
    assert set(model["test"]) == {"r/none", "r/literal", "r/seed", "r/searched", "plain/none",
                                  "plain/searched"}
    r = model["test"]
    assert model["r_gain_vs_none"] == pytest.approx(r["r/searched"]["overall"]
                                                    - r["r/none"]["overall"])
    assert isinstance(got["within_target"], bool) and model["system_prompt"]
    assert got["long_captions"]["long_caption_prob"] == 0.5
    assert isinstance(got["long_captions"]["picked_long_rule"], bool)
