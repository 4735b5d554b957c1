"""Batched rollouts: many prompts at several sizes drawn in one call, one batch per size.

Not under ``@torch.no_grad``: RL wraps it in ``no_grad`` (its updates read only the clean
samples), while a distillation student backpropagates through its few steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lens_model.denoiser import LensDenoiser, _pad
from lens_model.flow_matching import euler_sigmas, flow_sample, shift_mu
from lens_model.transformer import UnpackedLayout


def pad_text(hidden: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-prompt (T_i, D) hidden states -> (B, T, D) zero-padded and the (B, T) mask; an empty
    prompt (T_i = 0) is fully masked zeros, as at inference."""
    length = max(1, max(h.shape[0] for h in hidden))
    states = torch.stack([_pad(h[None], length)[0] for h in hidden])
    mask = torch.stack([torch.arange(length) < h.shape[0] for h in hidden])
    return states, mask


def rollout(denoiser: LensDenoiser, hidden: list[Tensor], sizes: list[tuple[int, int]],
            seeds: list[int], steps: int, downsample: int, mu_rule: dict[str, float],
            order: int = 2, guidance: float | None = None, max_batch: int = 256) -> list[Tensor]:
    """Latents (C, h, w), one per prompt: ``hidden[i]`` (T_i, L*D) frozen-LM states, drawn at
    ``sizes[i]`` (W, H) px from noise seeded ``seeds[i]`` with ``steps`` Euler (``order`` 1)
    or Heun (2) steps; with ``guidance``, CFG against the empty prompt."""
    if not len(hidden) == len(sizes) == len(seeds):
        raise ValueError(f"rollout got {len(hidden)} prompts, {len(sizes)} sizes and "
                         f"{len(seeds)} seeds; pass one of each per image")
    cfg = denoiser.transformer.transformer_config
    device = next(denoiser.parameters()).device
    out: list[Tensor | None] = [None] * len(hidden)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        by_size.setdefault(size, []).append(i)
    for (width, height), members in sorted(by_size.items()):
        h, w = height // downsample, width // downsample
        mu = float(shift_mu((h // cfg.patch_size) * (w // cfg.patch_size), **mu_rule))
        sigmas = euler_sigmas(steps, mu)
        for start in range(0, len(members), max_batch):
            part = members[start:start + max_batch]
            noise = torch.cat([torch.randn((1, cfg.in_channels, h, w),
                                           generator=torch.Generator().manual_seed(seeds[i]))
                               for i in part]).to(device)  # CPU draws: the same on any device
            states, mask = pad_text([hidden[i] for i in part])
            if guidance is not None:
                empty = states.new_zeros(states.shape)
                states, mask = torch.cat([states, empty]), torch.cat([mask, mask & False])
            states, mask = states.to(device), mask.to(device)
            layout = denoiser.transformer.unpacked_layout((len(mask), *noise.shape[1:]), mask)

            def velocity(x: Tensor, t: Tensor, states: Tensor = states, mask: Tensor = mask,
                         layout: UnpackedLayout = layout) -> Tensor:
                return denoiser.velocity(x, states, mask, t, layout).float()

            z = flow_sample(velocity, noise, sigmas, guidance, token_dim=1, order=order)
            for j, i in enumerate(part):
                out[i] = z[j]
    return [z for z in out if z is not None]
