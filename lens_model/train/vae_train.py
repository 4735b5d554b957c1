"""Plain PyTorch training of a (tiny) semantic VAE: reconstruction + KL, AdamW, BN statistics.

Each step encodes a batch, draws a reparameterised latent from the posterior, decodes it and
minimises ``recon + kl_weight * kl``, where ``recon`` is the mean L1 (or MSE) over pixels in
[-1, 1] and ``kl`` is the posterior's KL to N(0, 1) averaged over latent elements (not summed,
so ``kl_weight`` does not depend on image size). After the update the VAE's BatchNorm sees the
patchified posterior modes in train mode, so its running statistics (momentum from the VAE
config, 0.1 for FLUX.2) follow the encoder and ``SemanticVAE.normalize`` is meaningful after
training. Quality is the reconstruction PSNR (dB, images in [0, 1], mean over images) on
held-out images, before and after.

Usage (the tiny recipe's VAE stage)::

    vae = SemanticVAE.tiny()
    metrics = train_vae(batches, vae, steps=2000, held_out=val_images, log=print)
    vae.save_pretrained("runs/vae")
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from lens_model.train.engine import lr_multiplier
from lens_model.vae import SemanticVAE, patchify

BatchSource = Iterable[Any] | Callable[[], Iterable[Any]]
LOSSES = ("l1", "mse")


def _as_groups(batch: Any) -> list[Tensor]:
    """One batch -> same-size image stacks: a (B, 3, H, W) tensor, (3, h, w) list or ``.images``."""
    if hasattr(batch, "images"):  # a lens_model.data.loader.Batch
        batch = batch.images
    if isinstance(batch, Tensor):
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"VAE training batch has shape {tuple(batch.shape)}; expected "
                             "(B, 3, H, W) in [-1, 1]")
        return [batch]
    if isinstance(batch, list | tuple) and batch and all(isinstance(t, Tensor) for t in batch):
        by_size: dict[tuple[int, ...], list[Tensor]] = {}
        for t in batch:
            if t.ndim != 3 or t.shape[0] != 3:
                raise ValueError(f"VAE training image has shape {tuple(t.shape)}; expected "
                                 "(3, h, w) in [-1, 1]")
            by_size.setdefault(tuple(t.shape), []).append(t)
        return [torch.stack(ts) for ts in by_size.values()]
    raise TypeError(f"VAE training batch of type {type(batch).__name__} is not a (B, 3, H, W) "
                    "tensor, a list of (3, h, w) tensors or a loader Batch")


def _batches(source: BatchSource) -> Iterator[list[Tensor]]:
    """Endless batches: a factory is called again, an iterable re-iterated, each epoch."""
    while True:
        count = 0
        for batch in source() if callable(source) else source:
            count += 1
            yield _as_groups(batch)
        if count == 0:
            raise ValueError("VAE training images yielded no batches (an iterator already "
                             "consumed?); pass a list of batches or a loader factory")


def random_crops(groups: list[Tensor], size: int, gen: torch.Generator) -> list[Tensor]:
    """Every image of ``groups`` cropped at random to size x size, as one (B, 3, size, size)
    stack: a convolutional VAE learns from any window, and one stack is one forward pass,
    where a mixed-size batch takes one per size (several times slower on a CPU)."""
    crops = []
    for g in groups:
        h, w = g.shape[-2:]
        if min(h, w) < size:
            raise ValueError(f"VAE crop {size} is larger than a {h}x{w} training image; set "
                             f"vae.crop to at most the smallest bucket side, {min(h, w)}")
        for img in g:
            top = int(torch.randint(h - size + 1, (1,), generator=gen))
            left = int(torch.randint(w - size + 1, (1,), generator=gen))
            crops.append(img[:, top:top + size, left:left + size])
    return [torch.stack(crops)]


def kl_per_element(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) averaged over all latent elements."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def psnr(images: Tensor, recon: Tensor) -> Tensor:
    """Per-image PSNR in dB of [-1, 1] images, measured on [0, 1]: (B,)."""
    a = ((images + 1) / 2).clamp(0, 1)
    b = ((recon + 1) / 2).clamp(0, 1)
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)


@torch.no_grad()
def evaluate_psnr(vae: SemanticVAE, images: Tensor, batch_size: int = 16) -> float:
    """Mean reconstruction PSNR (dB) of ``images`` (B, 3, H, W) through the posterior mode."""
    was_training = vae.training
    vae.eval()
    scores = [psnr(chunk, vae.reconstruct(chunk)) for chunk in images.split(batch_size)]
    vae.train(was_training)
    return float(torch.cat(scores).mean())


def _step_loss(vae: SemanticVAE, images: Tensor, kl_weight: float, loss: str,
               gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(total, recon, kl, posterior mode) for one same-size stack (B, 3, H, W)."""
    posterior = vae.model.encode(images).latent_dist
    eps = torch.randn(posterior.mean.shape, generator=gen, dtype=posterior.mean.dtype)
    z = posterior.mean + posterior.std * eps.to(posterior.mean.device)  # reparameterised
    recon_images = vae.model.decode(z).sample
    if loss == "l1":
        recon = F.l1_loss(recon_images, images)
    else:
        recon = F.mse_loss(recon_images, images)
    kl = kl_per_element(posterior.mean, posterior.logvar)
    return recon + kl_weight * kl, recon, kl, posterior.mode()


def train_vae(images: BatchSource, vae: SemanticVAE, steps: int, lr: float = 1e-3,
              kl_weight: float = 1e-4, log: Callable[[int, dict], None] | None = None, *,
              held_out: Tensor, loss: str = "l1", weight_decay: float = 0.0,
              grad_clip: float = 1.0, log_every: int = 10, seed: int = 0,
              crop: int | None = None, decay_frac: float = 0.0) -> dict[str, float]:
    """Train ``vae`` in place for ``steps`` AdamW steps; metrics with held-out PSNR before/after.

    ``crop``: train on random crop x crop windows of the images (see ``random_crops``).
    ``decay_frac``: cool the LR linearly to 0 over this share of the steps. At a constant LR
    a short run stops wherever its noisy loss happens to be."""
    if steps < 1:
        raise ValueError(f"VAE training steps={steps} must be >= 1")
    if not 0 <= decay_frac < 1:
        raise ValueError(f"VAE decay_frac={decay_frac} must be in [0, 1)")
    if loss not in LOSSES:
        raise ValueError(f"VAE reconstruction loss {loss!r} is unknown; use one of {LOSSES}")
    vae._check_images(held_out)
    device = next(vae.parameters()).device
    held_out = held_out.to(device)
    psnr_before = evaluate_psnr(vae, held_out)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_multiplier(0, steps, round(decay_frac * steps)))
    vae.train()
    stream = _batches(images)
    start = time.perf_counter()
    seen = 0
    stats: dict[str, float] = {}
    for step in range(1, steps + 1):
        groups = next(stream)
        if crop is not None:
            groups = random_crops(groups, crop, gen)
        groups = [g.to(device) for g in groups]
        pixels = sum(g[0].numel() * len(g) for g in groups)
        opt.zero_grad(set_to_none=True)
        parts = []
        for g in groups:  # mixed sizes: weight each stack by its share of the pixels
            total, recon, kl, mode = _step_loss(vae, g, kl_weight, loss, gen)
            (total * (g[0].numel() * len(g) / pixels)).backward()
            parts.append((total.item(), recon.item(), kl.item(), len(g)))
            with torch.no_grad():  # BN running statistics follow the encoder (train mode)
                vae.model.bn.train()
                vae.model.bn(patchify(mode.detach()))
        grad_norm = torch.nn.utils.clip_grad_norm_(vae.model.parameters(), grad_clip)
        used_lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        n = sum(p[3] for p in parts)
        seen += n
        stats = {"loss": sum(p[0] * p[3] for p in parts) / n,
                 "recon": sum(p[1] * p[3] for p in parts) / n,
                 "kl": sum(p[2] * p[3] for p in parts) / n,
                 "grad_norm": float(grad_norm), "lr": used_lr}
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"VAE training loss became {stats['loss']} at step {step}; "
                                     f"lower lr={lr} or grad_clip={grad_clip}")
        if log is not None and (step % log_every == 0 or step == steps):
            log(step, dict(stats))
    seconds = time.perf_counter() - start
    vae.eval()
    return {**stats, "steps": float(steps), "images_seen": float(seen),
            "seconds": seconds, "seconds_per_step": seconds / steps,
            "psnr_before": psnr_before, "psnr": evaluate_psnr(vae, held_out)}


@torch.no_grad()
def reconstruction_grid(vae: SemanticVAE, images: Tensor, max_images: int = 8) -> Image.Image:
    """Originals (top row) above their reconstructions (bottom row), as one RGB image."""
    was_training = vae.training
    vae.eval()
    originals = images[:max_images]
    recon = vae.reconstruct(originals.to(next(vae.parameters()).device)).cpu()
    vae.train(was_training)
    rows = [torch.cat(list(originals.cpu()), dim=2), torch.cat(list(recon), dim=2)]  # (3, H, nW)
    grid = ((torch.cat(rows, dim=1) + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(grid.permute(1, 2, 0).numpy()))


def held_out_images(dataset: str | Path, n: int, size: int) -> Tensor:
    """The manifest's last ``n`` images, fitted to size x size: (n, 3, size, size) in [-1, 1]."""
    from lens_model.buckets import Bucket
    from lens_model.data import shards
    from lens_model.data.loader import fitted_pixels, read_manifest, to_signed

    root = Path(dataset)
    manifest = read_manifest(root)
    out = []
    for key, shard in list(zip(manifest.keys, manifest.shards, strict=True))[-n:]:
        members = shards.index_shard(root / shard)[key]
        with open(root / shard, "rb") as fh:
            data = shards.read_member(fh, *members[shards.image_member(members)])
        out.append(to_signed(fitted_pixels(data, Bucket(size, size, size))))
    return torch.stack(out)
