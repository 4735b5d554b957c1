"""The distillation program: exact resume across a kill, the turbo model's saved schedule,
a NaN that stops the stage with the last good checkpoint kept, and the mechanism: a short
distillation of a briefly trained teacher brings its 4-step samples toward its 20-step ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lens_model import defaults
from lens_model.data.captions import prompt_set
from lens_model.pipeline import load_pipeline
from lens_model.recipe import load_recipe
from lens_model.train.distill import balanced_subset
from tests.conftest import BRIEF, BriefTeacher, program_events, straight_and_resumed
from tests.test_rl import random_final

SHORT = ["data.num_samples=48", "data.samples_per_shard=48", "distill.steps=4",
         "distill.ckpt_every=2", "distill.keep_last=3", "distill.batch=2", "distill.ttur=2",
         "distill.num_samples=16", "distill.precision=fp32", "distill.lr=0.0001",
         "distill.log_every=1", "eval.size=32x32", "eval.steps=4"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A random tiny teacher saved as a training final/, and a small validated dataset."""
    from tasks import dataset

    root = tmp_path_factory.mktemp("distill")
    recipe = load_recipe("tiny", SHORT)
    final = random_final(root, recipe, "rl")
    dataset.prepare_all(recipe, root / "raw")
    dataset.validate_all(recipe, root / "raw", root / "data")
    return final, root


def _args(inputs: tuple[Path, Path], run: Path, extra: tuple[str, ...] = ()) -> list[str]:
    final, root = inputs
    recipe = load_recipe("tiny", [*SHORT, *extra])
    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    return ["--params", str(run / "recipe.yaml"), "--model", str(final), "--dataset",
            str(root / "data"), "--features", str(root / "features"), "--run-dir", str(run)]


def test_the_distill_program_resumed_at_half_matches_the_straight_run(inputs, tmp_path) -> None:
    straight, resumed = straight_and_resumed(
        lambda run: program_events("distill", _args(inputs, run), run), tmp_path)
    name = "final/transformer/diffusion_pytorch_model.safetensors"
    a, b = (load_file(tmp_path / side / name) for side in ("straight", "resumed"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    teacher = load_file(inputs[0] / "transformer" / "diffusion_pytorch_model.safetensors")
    assert max((a[k] - teacher[k]).abs().max().item() for k in a) > 0  # the student moved

    def metrics(events: list[dict], step: int) -> dict:
        return [e["metrics"] for e in events if e.get("step") == step
                and "train/loss" in e.get("metrics", {})][-1]

    for step in (3, 4):  # the same batches, critic updates, noise and timesteps
        for key in ("train/loss", "student/dmd", "critic/fake_loss", "critic/disc_loss"):
            assert metrics(resumed, step)[key] == pytest.approx(metrics(straight, step)[key],
                                                                abs=1e-6), key
    lens = json.loads((tmp_path / "straight" / "final" / "lens.json").read_text())
    sigmas = lens["turbo"]["sigmas"]
    assert len(sigmas) == 4 and sigmas[0] == 1.0 and lens["turbo"]["guidance"] is None
    assert sorted(sigmas, reverse=True) == sigmas
    assert (tmp_path / "straight" / "samples" / "turbo-step-00000004.png").is_file()
    # the saved student draws on that schedule, CFG-free, through the pipeline and its save
    pipe = load_pipeline(tmp_path / "straight" / "final")
    pipe.save_pretrained(tmp_path / "saved")
    pipe = load_pipeline(tmp_path / "saved")
    assert pipe.turbo_steps == 4
    kw: dict = {"size": "32x32", "seed": 0, "output_type": "latent"}
    default = pipe(["a red square"], **kw).images
    same = pipe(["a red square"], num_inference_steps=4, guidance_scale=1.0, **kw).images
    assert torch.equal(default, same)
    assert not torch.allclose(default, pipe(["a red square"], guidance_scale=5.0, **kw).images)
    with pytest.raises(ValueError, match="draws in the 4 steps it was distilled for"):
        pipe(["a red square"], num_inference_steps=20, **kw)


def test_a_nan_stops_the_stage_naming_the_step_and_keeps_the_last_checkpoint(
        inputs, tmp_path) -> None:
    # an LR this large blows the critic up in its first updates, before the student's loss
    args = _args(inputs, tmp_path, ("distill.lr=1e30", "distill.steps=6", "distill.ckpt_every=1"))
    with pytest.raises(RuntimeError, match=r"distill step 1: loss is nan.* the last good "
                                           r"checkpoint \(none yet\) is kept"):
        program_events("distill", args, tmp_path)
    # the failing step was not saved over the good state
    assert not list((tmp_path / "checkpoints").glob("step-*"))
    assert not (tmp_path / "final").exists()


def test_the_balanced_subset_deals_evenly_over_buckets() -> None:
    buckets = {f"a{i}": "32x32" for i in range(10)} | {f"b{i}": "40x24" for i in range(3)}
    subset = balanced_subset(buckets, 8, seed=0)
    assert len(subset["40x24"]) == 3 and len(subset["32x32"]) == 5
    assert subset == balanced_subset(buckets, 8, seed=0)


MECHANISM = ["distill.steps=25", "distill.batch=8", "distill.ttur=2", "distill.num_samples=512",
             "distill.guidance=4.0", "distill.lr=3e-5", "distill.disc_lr=1e-5",
             "distill.ca_t_range=[0.2,0.8]", "distill.ca_above_step=false",
             "distill.precision=fp32", "distill.ckpt_every=1000", "distill.log_every=10"]
# The student's distance at most this share of the undistilled model's. Not far below: CA moves
# samples the way CFG shifts the distribution, only partly along each seed's own gap to its CFG
# sample (docs/distill.md holds the measured curve).
MARGIN = 0.92


@pytest.mark.timeout(1200)  # the brief teacher's setup counts against the first test using it
def test_a_short_distillation_brings_4_steps_toward_the_teachers_cfg_samples(
        brief_teacher: BriefTeacher, tmp_path: Path) -> None:
    """The teacher's 20-step CFG samples are the reference (eval prompts, fixed seeds). The
    student's 4-step CFG-free latents are nearer them, in mean squared distance, than the
    teacher's own 4 steps without CFG, by the margin above."""
    recipe = load_recipe("tiny", [*BRIEF, *MECHANISM])
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    program_events("distill", ["--params", str(tmp_path / "recipe.yaml"), "--model",
                               brief_teacher.model, "--dataset", str(brief_teacher.data),
                               "--features", str(defaults.lens_home() / "features"),
                               "--run-dir", str(tmp_path)], tmp_path)
    teacher, student = load_pipeline(brief_teacher.model), load_pipeline(tmp_path / "final")
    prompts = [p.text for p in prompt_set(6, 123)]
    kw: dict = {"size": "32x32", "seed": 5000, "output_type": "latent"}
    reference = teacher(prompts, num_inference_steps=20, guidance_scale=4.0, **kw).images
    undistilled = teacher(prompts, num_inference_steps=4, guidance_scale=1.0, **kw).images
    turbo = student(prompts, **kw).images
    near, far = ((x - reference).square().mean().item() for x in (turbo, undistilled))
    print(f"distance to the teacher's 20-step CFG latents: student {near:.4f}, "
          f"undistilled {far:.4f} ({near / far:.2f})")
    assert near <= MARGIN * far, (near, far)


def test_a_missing_teacher_is_named(tmp_path: Path) -> None:
    from lens_model.train.distill import main

    recipe = load_recipe("tiny", SHORT)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    with pytest.raises(FileNotFoundError, match="nowhere has no lens.json"):
        main(["--params", str(tmp_path / "recipe.yaml"), "--model", str(tmp_path / "nowhere"),
              "--dataset", str(tmp_path), "--features", str(tmp_path), "--run-dir",
              str(tmp_path / "run")])
