"""SemanticVAE shapes, BatchNorm normalisation, save/load, and a short tiny-VAE training run."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lens_model.buckets import Bucket
from lens_model.data.shapes import make_items
from lens_model.train.vae_train import (
    evaluate_psnr,
    random_crops,
    reconstruction_grid,
    train_vae,
)
from lens_model.vae import SemanticVAE, patchify, unpatchify

SIZES = [(24, 48), (40, 24), (64, 64), (96, 48)]  # (H, W)


@pytest.fixture(scope="module")
def vae() -> SemanticVAE:
    torch.manual_seed(0)
    model = SemanticVAE.tiny(latent_channels=8, downsample=4)
    # non-trivial statistics so normalisation is visible in every test
    gen = torch.Generator().manual_seed(1)
    model.model.bn.running_mean.copy_(torch.randn(32, generator=gen))
    model.model.bn.running_var.copy_(torch.rand(32, generator=gen) * 3 + 0.5)
    return model.eval()


def shapes_images(start: int, stop: int, side: int) -> torch.Tensor:
    """Rendered shapes-world scenes (B, 3, side, side) in [-1, 1]."""
    out = []
    for item in make_items(0, start, stop, [Bucket(side, side, side)], 1, 4):
        rgb = np.asarray(Image.open(io.BytesIO(item.image)).convert("RGB"), dtype=np.float32)
        out.append(torch.from_numpy(rgb).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)


def test_patchify_round_trip_and_channel_order() -> None:
    z = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    zp = patchify(z)
    assert zp.shape == (2, 12, 2, 3)
    # channel c * 4 + dy * 2 + dx holds z[c, 2i + dy, 2j + dx]
    assert zp[1, 2 * 4 + 1 * 2 + 0, 1, 2] == z[1, 2, 3, 4]
    assert torch.equal(unpatchify(zp), z)


@pytest.mark.parametrize("size", SIZES)
def test_shapes_at_bucket_sizes(vae: SemanticVAE, size: tuple[int, int]) -> None:
    h, w = size
    images = torch.rand(2, 3, h, w) * 2 - 1
    with torch.no_grad():
        z = vae.encode_latent(images)
        tokens = vae.encode(images)
        back = vae.decode_latent(z)
        back_tokens = vae.decode(tokens, (h // 8, w // 8))
    assert vae.downsample == 4 and vae.token_px == 8 and vae.token_dim == 32
    assert z.shape == (2, 8, h // 4, w // 4)
    assert tokens.shape == (2, (h // 8) * (w // 8), 32)
    assert back.shape == images.shape
    torch.testing.assert_close(back_tokens, back, atol=1e-5, rtol=0)
    # tokens are the row-major patchified form of the normalised latent
    torch.testing.assert_close(tokens, patchify(z).flatten(2).transpose(1, 2))


def test_normalisation_uses_running_statistics(vae: SemanticVAE) -> None:
    images = torch.rand(4, 3, 24, 48) * 2 - 1
    with torch.no_grad():
        raw = vae.raw_latent(images)
        z = vae.encode_latent(images)
        halves = torch.cat([vae.encode_latent(images[:2]), vae.encode_latent(images[2:])])
    torch.testing.assert_close(z, halves, atol=1e-5, rtol=0)  # no batch statistics
    bn = vae.model.bn
    expect = (patchify(raw) - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        bn.running_var.view(1, -1, 1, 1) + bn.eps)
    torch.testing.assert_close(patchify(z), expect, atol=1e-5, rtol=1e-5)
    assert bn.eps == 1e-4  # FLUX.2's batch_norm_eps
    with torch.no_grad():  # decode_latent undoes the normalisation before the decoder
        torch.testing.assert_close(vae.decode_latent(z), vae.model.decode(raw).sample,
                                   atol=1e-4, rtol=0)


def test_bad_sizes_are_rejected(vae: SemanticVAE) -> None:
    with pytest.raises(ValueError, match="not divisible by 8"):
        vae.encode_latent(torch.zeros(1, 3, 28, 48))
    with pytest.raises(ValueError, match="do not fit grid"):
        vae.decode(torch.zeros(1, 10, 32), (3, 6))
    with pytest.raises(ValueError, match="power of two"):
        SemanticVAE.tiny(downsample=3)


def test_save_load_round_trip(vae: SemanticVAE, tmp_path: Path) -> None:
    vae.save_pretrained(tmp_path / "vae")
    loaded = SemanticVAE.from_pretrained(tmp_path / "vae").eval()
    assert loaded.identity() == vae.identity()
    torch.testing.assert_close(loaded.model.bn.running_var, vae.model.bn.running_var)
    images = torch.rand(2, 3, 40, 24) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(images), vae.encode(images))
    changed = SemanticVAE.from_pretrained(tmp_path / "vae")
    with torch.no_grad():
        changed.model.bn.running_mean.add_(1.0)
    assert changed.identity() != vae.identity()
    with pytest.raises(FileNotFoundError, match="local folder"):
        SemanticVAE.from_pretrained(tmp_path / "missing")


def test_tiny_training_raises_psnr() -> None:
    """60 steps, batch 16, on 64 rendered 32x32 scenes; held-out PSNR rises by > 3 dB.

    About 5 s on 2 idle cores; time is measured by train_vae, not asserted (shared CPUs).
    """
    train, held_out = shapes_images(0, 64, 32), shapes_images(1000, 1016, 32)
    torch.manual_seed(0)
    model = SemanticVAE.tiny()
    logged: list[int] = []
    metrics = train_vae(list(train.split(16)), model, steps=60, lr=4e-3, kl_weight=1e-4,
                        log=lambda step, m: logged.append(step), held_out=held_out)
    assert metrics["psnr"] > metrics["psnr_before"] + 3.0, metrics
    assert metrics["psnr"] == pytest.approx(evaluate_psnr(model, held_out), abs=1e-4)
    assert logged == [10, 20, 30, 40, 50, 60] and metrics["images_seen"] == 960
    # the BN statistics followed the encoder: every normalised channel of held-out latents is
    # near standard (the raw latents here have channel means up to ~1 and stds up to ~4)
    with torch.no_grad():
        zp = patchify(model.encode_latent(held_out))
    assert zp.mean(dim=(0, 2, 3)).abs().max() < 0.5
    std = zp.std(dim=(0, 2, 3))
    assert 0.7 < float(std.min()) and float(std.max()) < 1.6, std
    grid = reconstruction_grid(model, held_out, max_images=4)
    assert grid.size == (4 * 32, 2 * 32) and grid.mode == "RGB"
    top = np.asarray(grid)[:32, :32].astype(np.float32)
    assert np.allclose(top / 127.5 - 1, held_out[0].permute(1, 2, 0).numpy(), atol=1 / 127.5)


def test_training_accepts_mixed_size_lists_and_rejects_empty_sources() -> None:
    torch.manual_seed(0)
    model = SemanticVAE.tiny()
    mixed = [torch.rand(3, 24, 48) * 2 - 1, torch.rand(3, 40, 24) * 2 - 1,
             torch.rand(3, 24, 48) * 2 - 1]
    before = model.identity()
    metrics = train_vae(lambda: [mixed], model, steps=2, held_out=torch.zeros(1, 3, 24, 48))
    assert metrics["images_seen"] == 6 and model.identity() != before
    with pytest.raises(ValueError, match="no batches"):
        train_vae(iter([]), model, steps=1, held_out=torch.zeros(1, 3, 24, 48))
    with pytest.raises(ValueError, match="expected"):
        train_vae([torch.zeros(2, 24, 48)], model, steps=1, held_out=torch.zeros(1, 3, 24, 48))


def test_training_cools_the_lr_down_over_decay_frac() -> None:
    torch.manual_seed(0)
    model = SemanticVAE.tiny()
    lrs: list[float] = []
    batch = [torch.rand(2, 3, 24, 24) * 2 - 1]
    train_vae(lambda: batch, model, steps=8, lr=1e-3, decay_frac=0.5, log_every=1,
              held_out=torch.zeros(1, 3, 24, 24), log=lambda step, m: lrs.append(m["lr"]))
    assert lrs == pytest.approx([1e-3] * 5 + [7.5e-4, 5e-4, 2.5e-4])
    with pytest.raises(ValueError, match="decay_frac=1.0 must be in"):
        train_vae(lambda: batch, model, steps=1, decay_frac=1.0,
                  held_out=torch.zeros(1, 3, 24, 24))


def test_random_crops_stack_mixed_sizes_into_one_batch() -> None:
    wide, tall = torch.rand(2, 3, 24, 48), torch.rand(1, 3, 40, 24)
    crops = random_crops([wide, tall], 24, torch.Generator().manual_seed(0))
    assert len(crops) == 1 and crops[0].shape == (3, 3, 24, 24)
    # each crop is a window of its own image
    img, crop = tall[0], crops[0][2]
    assert any(torch.equal(img[:, top:top + 24], crop) for top in range(17))
    with pytest.raises(ValueError, match="vae.crop to at most the smallest bucket side, 24"):
        random_crops([wide], 32, torch.Generator())
    torch.manual_seed(0)
    model = SemanticVAE.tiny()
    metrics = train_vae(lambda: [[*wide, *tall]], model, steps=2, crop=24,
                        held_out=torch.zeros(1, 3, 24, 48))
    assert metrics["images_seen"] == 6
