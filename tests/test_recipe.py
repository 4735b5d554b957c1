"""Recipes: schema, refusals that name the key, overrides, stable hashes, buckets."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from lens_model import defaults
from lens_model.buckets import assign_bucket, buckets_for, fit_to_bucket, make_buckets
from lens_model.recipe import ASPECT_RATIOS_1_2_TO_2_1, RecipeError, load_recipe


@pytest.mark.parametrize("name", ["tiny", "toy", "lens-3.8b", "lens-3.8b-512"])
def test_shipped_recipes_load_with_stable_hash(name: str) -> None:
    a, b = load_recipe(name), load_recipe(name)
    assert a.name == name and a.hash() == b.hash() and len(a.hash()) == 12


def test_override_changes_value_and_hash() -> None:
    base = load_recipe("tiny")
    changed = load_recipe("tiny", ["data.num_samples=64", "data.contract.max_tokens=128"])
    assert changed.data.num_samples == 64 and changed.data.contract.max_tokens == 128
    assert changed.hash() != base.hash()


def test_unknown_key_names_key_and_allowed_keys() -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny", ["data.num_sample=3"])
    msg = str(err.value)
    assert "data.num_sample" in msg and "num_samples" in msg and "samples_per_shard" in msg


def test_bad_literal_names_allowed_values() -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny", ["data.task_runner=ray"])
    assert "data.task_runner" in str(err.value) and "'threads'" in str(err.value)
    assert "'dask'" in str(err.value)
    with pytest.raises(RecipeError, match="pretrain.zero_stage") as err:  # left out, see recipe
        load_recipe("tiny", ["pretrain.zero_stage=3"])
    assert "2" in str(err.value)


def test_world_narrowing_names_unknown_backgrounds_and_patterns() -> None:
    r = load_recipe("tiny", ['data.backgrounds=["cream", "mint"]'])
    assert r.data.backgrounds == ["cream", "mint"]
    with pytest.raises(ValueError, match=r"background 'teal' is unknown; use one of: light"):
        load_recipe("tiny", ['data.backgrounds=["teal"]'])
    with pytest.raises(ValueError, match=r"pattern 'dots' is unknown"):
        load_recipe("tiny", ['data.patterns=["dots"]'])
    with pytest.raises(ValueError, match="patterns"):
        load_recipe("tiny", ["data.patterns=[]"])


def test_bad_value_and_bad_override_and_unknown_recipe() -> None:
    with pytest.raises(RecipeError, match="data.num_samples"):
        load_recipe("tiny", ["data.num_samples=0"])
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe("tiny", ["data.num_samples"])
    with pytest.raises(RecipeError, match="known recipes: .*tiny"):
        load_recipe("nope")
    with pytest.raises(RecipeError, match="aspect ratio"):
        load_recipe("tiny", ["buckets.aspect_ratios=[wide]"])
    with pytest.raises(RecipeError, match="crop 30 must be a multiple of downsample 4; use 28"):
        load_recipe("tiny", ["vae.crop=30"])
    too_big = "vae.crop 32 is larger than the smallest bucket side, 24 px"
    with pytest.raises(RecipeError, match=too_big):
        load_recipe("tiny", ["vae.crop=32"])  # 40x24 at 32^2 and 16:9
    assert load_recipe("tiny", ["vae.crop=24"]).vae.crop == 24
    with pytest.raises(RecipeError, match="pretrain.decay_frac"):
        load_recipe("tiny", ["pretrain.decay_frac=1.5"])
    wsd = load_recipe("tiny", ["pretrain.steps=1500", "pretrain.decay_frac=0.3"])
    assert wsd.pretrain.decay_steps == 450
    assert load_recipe("tiny", ["pretrain.steps=6"]).pretrain.decay_steps == 0  # < warmup: ok
    with pytest.raises(RecipeError, match="rl.ckpt_every=10 is not a multiple of "
                                          "rl.updates_per_rollout=4"):
        load_recipe("tiny", ["rl.updates_per_rollout=4", "rl.steps=40", "rl.ckpt_every=10"])


def test_paper_buckets() -> None:
    buckets = buckets_for(load_recipe("lens-3.8b").buckets)
    names = {b.name for b in buckets}
    assert len(buckets) == 27
    assert {"736x1472", "1472x736", "1024x1024", "512x512", "768x768"} <= names
    assert all(0.5 <= b.aspect <= 2.0 and b.width % 32 == 0 and b.height % 32 == 0
               for b in buckets)
    assert next(b for b in buckets if b.name == "1024x1024").tokens(16) == 4096
    assert all(b.tokens(16) == (b.width // 16) * (b.height // 16) for b in buckets)


def test_tiny_buckets_are_small_and_cover_the_nine_ratios() -> None:
    buckets = buckets_for(load_recipe("tiny").buckets)
    assert {b.base for b in buckets} == {32, 40}
    # at 8 px steps two ratios may snap to one size; each base keeps at least 7 distinct ones
    assert all(sum(b.base == base for b in buckets) >= 7 for base in (32, 40))
    assert max(b.width * b.height for b in buckets) <= 1.3 * 40 * 40
    assert {b.name for b in buckets} >= {"24x48", "48x24", "32x32", "40x40", "32x64", "64x32"}


def test_assignment_policy_and_fit() -> None:
    buckets = make_buckets([512, 768, 1024], ASPECT_RATIOS_1_2_TO_2_1, 32)
    assert assign_bucket(2000, 1000, buckets).name == "1472x736"  # 2:1, big enough for 1024^2
    assert assign_bucket(800, 400, buckets).name == "704x352"  # 2:1 below 768^2 -> 512 base
    assert assign_bucket(100, 100, buckets).name == "512x512"  # too small: smallest base
    assert assign_bucket(1000, 1000, buckets).name == "768x768"  # never upscale to 1024
    out = fit_to_bucket(Image.new("RGB", (1000, 700)), assign_bucket(1000, 700, buckets))
    assert out.size == (960, 640)  # 1000:700 is nearest 3:2; at 768^2 that is 960x640
    with pytest.raises(ValueError, match="0x10"):
        assign_bucket(0, 10, buckets)


def test_defaults_yield_to_user_values(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LENS_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://u@db/mlflow")
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    defaults.apply()
    assert os.environ["MLFLOW_TRACKING_URI"] == "postgresql://u@db/mlflow"
    assert os.environ["PREFECT_HOME"] == str(tmp_path / "h" / "prefect")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert defaults.mlflow_uri() == f"sqlite:///{tmp_path / 'h' / 'mlflow.db'}"


def test_model_info_cli(capsys) -> None:
    from lens import cli

    assert cli.main(["model", "info", "lens-3.8b", "--json"]) == 0
    out = __import__("json").loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 3.7e9 <= out["params"] <= 4.2e9 and out["image_tokens"] == 4096
    assert cli.main(["model", "info", "nope"]) == 2
    assert "tiny, toy, lens-3.8b" in capsys.readouterr().err


@pytest.mark.parametrize("sigmas", ["[1.0,0.5]", "[0.9,0.6,0.3,0.1]", "[1.0,0.5,0.6,0.1]",
                                    "[1.0,0.6,0.3,0.0]"])
def test_a_student_schedule_it_cannot_take_names_the_field(sigmas: str) -> None:
    with pytest.raises(RecipeError, match=r"distill.sigmas .* give 4 noise levels"):
        load_recipe("tiny", [f"distill.sigmas={sigmas}"])
    assert load_recipe("tiny", ["distill.sigmas=[1.0,0.6,0.3,0.1]"]).distill.sigmas[-1] == 0.1


def test_the_distill_section_changes_only_the_turbo_hash() -> None:
    base, other = load_recipe("tiny"), load_recipe("tiny", ["distill.ttur=3"])
    assert base.train_hash() == other.train_hash() and base.rl_hash() == other.rl_hash()
    assert base.distill_hash() != other.distill_hash()


def test_the_paper_stages_are_two_recipes_the_second_from_the_first(tmp_path) -> None:
    """lens-3.8b-512 extends lens-3.8b: 512^2 at LR 2e-4; lens-3.8b continues from it over
    the 27 buckets at LR 1e-4. ``extends`` merges section by section; a loop is refused."""
    first, second = load_recipe("lens-3.8b-512"), load_recipe("lens-3.8b")
    assert first.name == "lens-3.8b-512" and first.buckets.base_sizes == [512]
    assert (first.pretrain.lr, first.pretrain.init_from) == (2e-4, None)
    assert len(buckets_for(second.buckets)) == 27 and second.pretrain.lr == 1e-4
    assert second.pretrain.init_from == "lens-3.8b-512"
    assert first.text_encoder == second.text_encoder and first.model == second.model
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"extends: {b}\n")
    b.write_text(f"extends: {a}\n")
    with pytest.raises(RecipeError, match="'extends' loops"):
        load_recipe(a)
