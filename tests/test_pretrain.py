"""The pretraining program's pieces on real tiny components: cached and online features give
the same loss; the feature cache is built once."""

from __future__ import annotations

import pytest
import torch

from lens_model.buckets import buckets_for
from lens_model.config import get_preset
from lens_model.data.loader import PackedLoader
from lens_model.denoiser import LensDenoiser
from lens_model.features import FeatureCache
from lens_model.recipe import load_recipe
from lens_model.text_encoder import LanguageEncoder
from lens_model.train.pretrain import LossFn, build_feature_cache
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
    build_feature_cache(cache, root / "data", encoder, vae)
    files = sorted(cache.path_for(n).stat().st_mtime_ns for n in ("shard-000000.tar",
                                                                   "shard-000001.tar"))
    build_feature_cache(cache, root / "data", encoder, vae)  # nothing to redo
    assert files == sorted(cache.path_for(n).stat().st_mtime_ns for n in ("shard-000000.tar",
                                                                           "shard-000001.tar"))
    features = {}
    for name in ("shard-000000.tar", "shard-000001.tar"):
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
