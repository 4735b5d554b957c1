"""The pretraining program's pieces on real tiny components: cached and online features give
the same loss; the feature cache is built once."""

from __future__ import annotations

import pytest
import torch

from lens_model.buckets import buckets_for
from lens_model.config import get_preset
from lens_model.data.loader import PackedLoader, read_manifest
from lens_model.denoiser import LensDenoiser
from lens_model.features import FeatureCache
from lens_model.recipe import load_recipe
from lens_model.text_encoder import LanguageEncoder
from lens_model.train.pretrain import (
    GRID_PROMPTS,
    LossFn,
    build_feature_cache,
    feature_shards,
    sample_grid,
)
from lens_model.transformer import LensTransformer2DModel
from lens_model.vae import SemanticVAE
from tasks import dataset

# long and short captions mixed (the small recipe's 0.9), so both feature paths are read
RECIPE = load_recipe("tiny", ["data.num_samples=32", "data.samples_per_shard=16",
                              "pretrain.short_caption_prob=0.9"])


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
    import shutil

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
        grid = sample_grid(half, encoder, vae, RECIPE, 32)
    assert grid.size == (32 * GRID_PROMPTS, 64)
