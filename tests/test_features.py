"""Feature cache: exact round trip, id-keyed directories, refusal of foreign files, atomicity."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lens_model.features import FeatureCache, Sample

ENC, VAE = "minilm-l6-v2@abc123", "flux2-vae@def456"


def _samples(n: int, seed: int = 0) -> list[Sample]:
    """Samples of varying text length and latent size, as an encoder and VAE would give; odd
    ones carry short-caption features."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = 3 + 5 * i  # text tokens
        h, w = (4, 8) if i % 2 else (6, 6)
        text = torch.randn(t, 16, generator=g).to(torch.bfloat16)
        mask = torch.arange(t) < t - i  # trailing padding on some
        short = torch.randn(2 + i, 16, generator=g).to(torch.bfloat16) if i % 2 else None
        out.append((f"{i:06d}", text, mask, torch.randn(32, h, w, generator=g), short))
    return out


def test_round_trip_exact_with_variable_sizes(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, ENC, VAE)
    samples = _samples(5)
    assert not cache.has("shard-00000")
    path = cache.build_shard("shard-00000", samples)
    assert path == cache.path_for("shard-00000") and cache.has("shard-00000")
    assert cache.keys("shard-00000") == [k for k, *_ in samples]
    loaded = cache.load("shard-00000")
    assert list(loaded) == [k for k, *_ in samples]
    for key, text, mask, latent, short in samples:
        got_text, got_mask, got_latent, got_short = loaded[key]
        assert got_text.dtype == torch.bfloat16 and got_mask.dtype == torch.bool
        assert torch.equal(got_text, text) and torch.equal(got_mask, mask)
        assert torch.equal(got_latent, latent)
        assert (got_short is None) == (short is None)
        assert short is None or torch.equal(got_short, short)
    # a subset, read lazily
    part = cache.load("shard-00000", keys=["000003"])
    assert list(part) == ["000003"] and torch.equal(part["000003"][2], samples[3][3])
    with pytest.raises(KeyError, match=r"no cached features for \['nope'\]"):
        cache.load("shard-00000", keys=["nope"])


def test_slices_of_one_batch_tensor_are_stored(tmp_path: Path) -> None:
    # an encoder returns (B, T, D); per-sample slices share its storage
    hidden, latents = torch.randn(3, 7, 8), torch.randn(3, 4, 2, 2)
    masks = torch.ones(3, 7, dtype=torch.bool)
    cache = FeatureCache(tmp_path, ENC, VAE)
    cache.build_shard("s", [(f"k{i}", hidden[i, : 3 + i], masks[i, : 3 + i], latents[i],
                             hidden[i, :2]) for i in range(3)])
    assert torch.equal(cache.load("s")["k2"][0], hidden[2, :5])


def test_ids_pick_the_directory(tmp_path: Path) -> None:
    a = FeatureCache(tmp_path, ENC, VAE)
    assert a.path_for("x").parent == tmp_path / a.digest
    assert FeatureCache(tmp_path, ENC, VAE).path_for("x") == a.path_for("x")
    others = [FeatureCache(tmp_path, ENC, "flux1-vae"), FeatureCache(tmp_path, "qwen3-0.6b", VAE),
              FeatureCache(tmp_path, VAE, ENC)]
    dirs = {a.dir} | {c.dir for c in others}
    assert len(dirs) == 4
    a.build_shard("x", _samples(1))
    assert not others[0].has("x")  # another VAE's cache does not see these features


def test_tampered_metadata_is_refused_naming_both_ids(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, ENC, VAE)
    path = cache.build_shard("s", _samples(2))
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    save_file(tensors, str(path), metadata={**meta, "vae_id": "sd3-vae"})
    with pytest.raises(ValueError, match=r"vae_id 'sd3-vae'.*for 'flux2-vae@def456'"):
        cache.load("s")
    with pytest.raises(ValueError, match=r"sd3-vae"):
        cache.has("s")
    save_file(tensors, str(path), metadata={**meta, "encoder_id": "qwen3-4b"})
    with pytest.raises(ValueError, match=r"encoder_id 'qwen3-4b'.*'minilm-l6-v2@abc123'"):
        cache.load("s")
    # a file whose tensors disagree with its key list
    save_file({k: v for k, v in tensors.items() if not k.endswith(".mask")}, str(path),
              metadata=meta)
    with pytest.raises(ValueError, match=r"do not match its key list"):
        cache.load("s")
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"unreadable.*rebuild"):
        cache.load("s")


def test_atomic_no_partial_file_when_writer_raises(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, ENC, VAE)

    def failing() -> Iterator[Sample]:
        yield from _samples(3)
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        cache.build_shard("s", failing())
    assert not cache.has("s") and not cache.path_for("s").exists()
    leftovers = list(cache.dir.glob("*")) if cache.dir.exists() else []
    assert [p.name for p in leftovers if p.name != "ids.json"] == []
    # an existing good shard survives a failed rebuild untouched
    good = _samples(2, seed=1)
    cache.build_shard("s", good)
    before = cache.path_for("s").read_bytes()
    with pytest.raises(RuntimeError):
        cache.build_shard("s", failing())
    assert cache.path_for("s").read_bytes() == before
    assert torch.equal(cache.load("s")["000001"][2], good[1][3])
    assert sorted(p.name for p in cache.dir.iterdir()) == ["ids.json", "s.safetensors"]


def test_bad_input_names_the_sample(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, ENC, VAE)
    key, text, mask, latent, _ = _samples(1)[0]
    with pytest.raises(ValueError, match=r"sample '000000'.*mask has 2 entries for 3"):
        cache.build_shard("s", [(key, text, mask[:2], latent, None)])
    with pytest.raises(ValueError, match=r"sample 'b'.*latent channels C is 4.*'a' has 32"):
        cache.build_shard("s", [("a", text, mask, latent, None),
                                ("b", text, mask, latent[:4], None)])
    with pytest.raises(ValueError, match=r"sample 'a'.*duplicate key"):
        cache.build_shard("s", [("a", text, mask, latent, None)] * 2)
    with pytest.raises(ValueError, match=r"expected text \(T, D\)"):
        cache.build_shard("s", [(key, text[None], mask, latent, None)])
    with pytest.raises(ValueError, match=r"sample '000000'.*short caption features"):
        cache.build_shard("s", [(key, text, mask, latent, text[:, :3])])
    with pytest.raises(ValueError, match=r"latent, short or None"):
        cache.build_shard("s", [(key, text, mask, latent)])
    with pytest.raises(ValueError, match=r"plain file name"):
        cache.path_for("../escape")
    with pytest.raises(FileNotFoundError, match=r"shard 'missing'.*build_shard"):
        cache.load("missing")
    with pytest.raises(ValueError, match=r"non-empty identity"):
        FeatureCache(tmp_path, "", VAE)
    assert not cache.path_for("s").exists()
