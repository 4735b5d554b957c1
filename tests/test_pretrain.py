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

RECIPE = load_recipe("tiny", ["data.num_samples=32", "data.samples_per_shard=16"])


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


def test_cached_and_online_features_give_the_same_loss(parts) -> None:
    root, vae, encoder, model = parts
    cache = FeatureCache(root / "features", encoder.identity(), vae.identity())
    names = build_feature_cache(cache, root / "data", encoder, vae)
    assert [n.rsplit("-", 1)[0] for n in names] == ["shard-000000.tar", "shard-000001.tar"]
    files = [cache.path_for(n).stat().st_mtime_ns for n in names]
    assert build_feature_cache(cache, root / "data", encoder, vae) == names  # nothing to redo
    assert files == [cache.path_for(n).stat().st_mtime_ns for n in names]
    features = {}
    for name in names:
        features.update(cache.load(name))
    loader = PackedLoader(root / "data", buckets_for(RECIPE.buckets), 8,
                          RECIPE.loader.token_budget, seed=0, num_workers=0)
    batch = next(iter(loader))
    losses = []
    for feats in (features, None):
        torch.manual_seed(1)
        losses.append(LossFn(RECIPE, feats, encoder, vae, 2)(model, batch))
    assert torch.isfinite(losses[0]) and losses[0] > 0
    assert torch.allclose(losses[0], losses[1], atol=1e-5)


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
