"""The pretraining program's pieces on real tiny components: cached and online features give
the same loss; the feature cache is built once; the whole program, on 1 and 2 processes,
resumes exactly from a checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lens_model.buckets import buckets_for
from lens_model.config import get_preset
from lens_model.data.loader import PackedLoader, read_manifest
from lens_model.data.world import SHAPES
from lens_model.denoiser import LensDenoiser
from lens_model.features import FeatureCache
from lens_model.recipe import load_recipe
from lens_model.text_encoder import LanguageEncoder
from lens_model.train.pretrain import (
    GRID_PROMPTS,
    LossFn,
    build_feature_cache,
    feature_shards,
    grid_prompts,
    sample_grid,
)
from lens_model.transformer import LensTransformer2DModel
from lens_model.vae import SemanticVAE
from tasks import dataset
from tests.conftest import program_events, straight_and_resumed

# long and short captions mixed (the paper keeps long ones only), so both feature paths are read
RECIPE_OVERRIDES = ["data.num_samples=32", "data.samples_per_shard=16",
                    "pretrain.short_caption_prob=0.9"]
RECIPE = load_recipe("tiny", RECIPE_OVERRIDES)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    dataset.prepare_all(RECIPE, root / "raw")
    dataset.validate_all(RECIPE, root / "raw", root / "data")
    torch.manual_seed(0)
    vae = SemanticVAE.tiny(latent_channels=8, downsample=4).eval()
    te = RECIPE.text_encoder
    cfg = get_preset("tiny", in_channels=8)
    encoder = LanguageEncoder.from_spec(te.path, list(te.layers), cfg.width, te.max_length)
    model = LensDenoiser(LensTransformer2DModel.from_preset("tiny", in_channels=8),
                         encoder.connector)
    for p in model.transformer.parameters():  # off adaLN-zero, so the loss sees the inputs
        torch.nn.init.normal_(p, std=0.02)
    return root, vae, encoder, model


def _load(cache: FeatureCache, names: list[str]) -> dict:
    features: dict = {}
    for name in names:
        features.update(cache.load(name))
    return features


def _losses(recipe, features, parts) -> list[torch.Tensor]:
    """One loader batch's loss from cached ``features``, then from the encoders online."""
    root, vae, encoder, model = parts
    loader = PackedLoader(root / "data", buckets_for(recipe.buckets), 8,
                          recipe.loader.token_budget, seed=0, num_workers=0)
    batch = next(iter(loader))
    losses = []
    for feats in (features, None):
        torch.manual_seed(1)
        losses.append(LossFn(recipe, feats, encoder, vae, 2)(model, batch))
    return losses


def test_cached_and_online_features_give_the_same_loss(parts) -> None:
    root, vae, encoder, model = parts
    cache = FeatureCache(root / "features", encoder.identity(), vae.identity())
    names = build_feature_cache(cache, root / "data", encoder, vae)
    assert [n.rsplit("-", 1)[0] for n in names] == ["shard-000000.tar", "shard-000001.tar"]
    files = [cache.path_for(n).stat().st_mtime_ns for n in names]
    assert build_feature_cache(cache, root / "data", encoder, vae) == names  # nothing to redo
    assert files == [cache.path_for(n).stat().st_mtime_ns for n in names]
    cached, online = _losses(RECIPE, _load(cache, names), parts)
    assert torch.isfinite(cached) and cached > 0
    assert torch.allclose(cached, online, atol=1e-5)


def test_a_short_caption_only_cache_skips_long_captions_and_gives_the_same_loss(parts) -> None:
    root, vae, encoder, model = parts
    cache = FeatureCache(root / "features", encoder.identity(), vae.identity())
    names = build_feature_cache(cache, root / "data", encoder, vae, long_captions=False)
    assert all(n.endswith("-short") for n in names)
    assert set(names).isdisjoint(build_feature_cache(cache, root / "data", encoder, vae))
    features = _load(cache, names)
    m = read_manifest(root / "data")
    short, _ = encoder.hidden([m.short_captions[0]])
    text, _, _, stored_short = features[m.keys[0]]
    assert text.shape == stored_short.shape == short[0].shape  # no long caption was encoded
    assert torch.allclose(text, short[0], atol=1e-5)
    only_short = load_recipe("tiny", ["pretrain.short_caption_prob=1.0"])
    cached, online = _losses(only_short, features, parts)
    assert torch.allclose(cached, online, atol=1e-5)


def test_changed_rows_get_their_own_feature_shard(parts, tmp_path) -> None:

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = parts[0]
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    before = feature_shards(data, read_manifest(data))
    table = pq.read_table(data / "manifest.parquet")
    captions = table.column("caption").to_pylist()
    captions[0] = captions[0] + " Rewritten."  # row 0 lives in shard 0
    table = table.set_column(table.schema.get_field_index("caption"), "caption",
                             pa.array(captions, pa.string()))
    pq.write_table(table, data / "manifest.parquet")
    after = feature_shards(data, read_manifest(data))
    assert list(before)[1] == list(after)[1] and list(before)[0] != list(after)[0]
    assert list(before.values()) == list(after.values())


def test_sample_grid_of_a_bf16_model_under_autocast(parts) -> None:
    """What the trainer does every sample_every steps when precision is bf16."""
    import copy

    _, vae, encoder, model = parts
    half = copy.deepcopy(model).to(torch.bfloat16)
    with torch.autocast("cpu", torch.bfloat16):
        grid = sample_grid(half, encoder, vae, RECIPE)
    assert RECIPE.eval.size == "32x32" and grid.size == (32 * GRID_PROMPTS, 64)


def test_grid_prompts_draw_each_shape_once_in_distinct_colours() -> None:
    prompts = grid_prompts(RECIPE)
    words = [text.split()[-2:] for text, _ in prompts]  # "a photo of a <colour> <shape>"
    assert [w[1] for w in words] == list(SHAPES)
    assert len({w[0] for w in words}) == len(SHAPES)
    assert all(image.size == (32, 32) for _, image in prompts)


# --- the whole program: N steps straight == resumed from the checkpoint at N/2 ---------------

def _args(parts, run: Path, nproc: int, *overrides: str) -> list[str]:
    """lens_model/train/pretrain.py's arguments for 4 steps on the fixture's data, on the CPU."""
    root, vae = parts[0], parts[1]
    vae_dir = root / "vae"
    if not vae_dir.exists():
        vae.save_pretrained(vae_dir)
    recipe = load_recipe("tiny", [*RECIPE_OVERRIDES, "pretrain.steps=4", "pretrain.ckpt_every=2",
                                  "pretrain.keep_last=3", "pretrain.sample_every=4",
                                  "pretrain.log_every=1", "pretrain.warmup_steps=1",
                                  "pretrain.decay_frac=0.5", "loader.token_budget=128",
                                  f"launch.nproc_per_node={nproc}",
                                  *overrides])
    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    return ["--params", str(run / "recipe.yaml"), "--dataset", str(root / "data"),
            "--vae", str(vae_dir), "--run-dir", str(run), "--features", str(root / "features")]


def _events(parts, run: Path, nproc: int) -> list[dict]:
    return program_events("pretrain", _args(parts, run, nproc), run, nproc)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "final"
    return {**load_file(final / "transformer" / "diffusion_pytorch_model.safetensors"),
            **{f"connector.{k}": v for k, v in load_file(final / "connector.safetensors").items()}}


# Two processes: slow (the engine's own two-process resume is in test_engine's default run).
@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_the_program_resumed_at_half_matches_the_straight_run(parts, tmp_path, nproc) -> None:
    """A kill right after the step-2 checkpoint leaves exactly that checkpoint: the program
    started on it must end where the straight run ended (EMA weights, losses, ledger)."""
    straight, resumed = straight_and_resumed(lambda run: _events(parts, run, nproc), tmp_path)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6

    def metrics(events: list[dict], step: int) -> dict:
        return [e["metrics"] for e in events if e.get("step") == step and "train/loss"
                in e.get("metrics", {})][-1]

    for step in (3, 4):  # the same batches, noise and timesteps after the resume
        assert metrics(resumed, step)["train/loss"] == pytest.approx(
            metrics(straight, step)["train/loss"], abs=1e-6)
    for key in ("compute/flops_total", "compute/images_total", "compute/steps"):
        assert metrics(resumed, 4)[key] == metrics(straight, 4)[key]  # checkpointed totals
    checkpoints = [e["checkpoint"] for e in straight if "checkpoint" in e]
    assert checkpoints == ["checkpoints/step-00000002", "checkpoints/step-00000004"]


def test_a_second_stage_starts_from_the_first_and_counts_every_micro_batch(parts,
                                                                          tmp_path) -> None:
    """--init loads the first stage's final/ before training (at a vanishing LR the second
    stage ends where it started); accumulating two micro-batches a step, the ledger counts
    twice the images of one; a model of another shape is refused by name."""
    first = tmp_path / "first"
    program_events("pretrain", _args(parts, first, 1, "pretrain.steps=2"), first)
    second = tmp_path / "second"
    events = program_events("pretrain", [*_args(parts, second, 1, "pretrain.steps=2",
                                                 "pretrain.lr=1e-12", "pretrain.warmup_steps=0",
                                                 "pretrain.gradient_accumulation_steps=2"),
                                         "--init", str(first / "final")], second)
    a, b = _weights(first), _weights(second)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    single = program_events("pretrain", _args(parts, tmp_path / "one", 1, "pretrain.steps=2"),
                            tmp_path / "one")

    def images(evts: list[dict]) -> float:
        return [e["metrics"]["compute/images_total"] for e in evts
                if "compute/images_total" in e.get("metrics", {})][-1]

    assert images(events) > images(single) > 0  # two loader batches a step, not one
    other = tmp_path / "other"
    with pytest.raises(ValueError, match="does not fit this recipe's model"):
        program_events("pretrain", [*_args(parts, other, 1, "model.pooled_text=false"),
                                    "--init", str(first / "final")], other)


def test_the_program_refuses_a_device_the_accelerator_is_not(parts, tmp_path) -> None:
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match="launch.device is 'cuda' but DeepSpeed's accelerator "
                                         "is 'cpu'"):
        program_events("pretrain", _args(parts, run, 1, "launch.device=cuda"), run)
    assert not (tmp_path / "run" / "checkpoints").exists()
