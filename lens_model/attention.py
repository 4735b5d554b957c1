"""Attention over packed rows: a token attends only to its own sample; padding to itself.

``plan_attention`` reads the segment ids once per batch (a sampler reuses its plan for every
step); the blocks then run without reading a value back to the host. Its kernels compute the
same thing (``tests/test_attention.py``):
- ``none``: rows of one sample without padding take plain SDPA, free to pick a fused kernel;
- ``flex``: FlexAttention with a block mask built from the segment ids, compiled (CUDA). No
  dense or key mask, and fully masked blocks are skipped. On the CPU torch 2.13's FlexAttention
  has no backward and its eager forward materialises the scores, so it is not the CPU default;
- ``segment``: one batched SDPA call per group of similar-length segments, sum n_i^2 work
  (the CPU default);
- ``dense``: SDPA with the (B, 1, L, L) block-diagonal mask; the reference, and what meta
  tensors (FLOP counting) take.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Kernel = Literal["auto", "flex", "segment", "dense"]
SEGMENT_ROUND = 16  # segment lengths round up to this, so few batched attention calls remain
# Per group of segments of one rounded length: (row, position) of each of its n slots as
# (k,) rows and (k, n) positions, and (k, n) which slots are real (the rest pad the group).
Segments = list[tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class AttentionPlan:
    """How a batch's blocks attend: ``full`` masks queries over the whole row, ``image``
    the last block's image-only queries (the first ``image_len`` tokens)."""

    kind: Literal["none", "flex", "segment", "dense"]
    image_len: int
    full: Any = None
    image: Any = None


def segment_mask(segment_ids: Tensor) -> Tensor:
    """(B, L) segment ids -> (B, 1, L, L) bool: same segment (>= 0), or the token itself."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids >= 0)[:, :, None]
    eye = torch.eye(segment_ids.shape[1], dtype=torch.bool, device=segment_ids.device)
    return ((same & real) | eye)[:, None]


def segment_index(segment_ids: Tensor) -> tuple[Segments, Tensor]:
    """Segments grouped by length rounded up to ``SEGMENT_ROUND``, and the (row, position)
    pairs of padding tokens."""
    by_len: dict[int, list[tuple[int, Tensor]]] = {}
    for row, ids in enumerate(segment_ids):
        for seg in torch.unique(ids[ids >= 0]).tolist():
            pos = (ids == seg).nonzero().squeeze(1)
            by_len.setdefault(-(-len(pos) // SEGMENT_ROUND) * SEGMENT_ROUND, []).append((row, pos))
    groups: Segments = []
    for n, members in sorted(by_len.items()):
        rows = torch.tensor([r for r, _ in members], device=segment_ids.device)
        idx = torch.zeros((len(members), n), dtype=torch.long, device=segment_ids.device)
        real = torch.zeros((len(members), n), dtype=torch.bool, device=segment_ids.device)
        for j, (_, pos) in enumerate(members):
            idx[j, :len(pos)], real[j, :len(pos)] = pos, True
        groups.append((rows, idx, real))
    return groups, (segment_ids < 0).nonzero()  # (P, 2)


def segment_attention(q: Tensor, k: Tensor, v: Tensor, index: tuple[Segments, Tensor]) -> Tensor:
    """Attention within each segment only: what the block-diagonal mask computes, at the cost
    of sum(n_i^2) instead of L^2, in one batched call per group of similar-length segments.
    q (B, H, Lq, D), k/v (B, H, L, D) -> (B, H, Lq, D). A padding query attends to itself
    alone, so its output is its own value."""
    groups, pads = index
    lq = q.shape[2]  # the last block queries image tokens only: positions < lq
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, L, H, D)
    out = qt.new_zeros(qt.shape)
    for rows, idx, real in groups:
        r = rows[:, None].expand_as(idx)
        qs = qt[r, idx.clamp(max=lq - 1)]  # (k, n, H, D); rows past lq are computed, not kept
        res = F.scaled_dot_product_attention(qs.transpose(1, 2), kt[r, idx].transpose(1, 2),
                                             vt[r, idx].transpose(1, 2),
                                             attn_mask=real[:, None, None, :])  # (k, H, n, D)
        keep = real & (idx < lq)
        out = out.index_put((r[keep], idx[keep]), res.transpose(1, 2)[keep])
    pads = pads[pads[:, 1] < lq]
    if len(pads):
        out = out.index_put((pads[:, 0], pads[:, 1]), vt[pads[:, 0], pads[:, 1]])
    return out.transpose(1, 2)


def _block_mask(segment_ids: Tensor, q_len: int) -> Any:
    """FlexAttention's block mask: query i (< q_len) sees key j of its own segment; padding
    sees itself alone."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_sample(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        seg_q = segment_ids[b, q]
        return ((seg_q == segment_ids[b, kv]) & (seg_q >= 0)) | (q == kv)

    b, length = segment_ids.shape
    return create_block_mask(same_sample, b, None, q_len, length, device=segment_ids.device)


def plan_attention(img_segment_ids: Tensor, txt_segment_ids: Tensor,
                   kernel: Kernel = "auto") -> AttentionPlan:
    """The attention plan of a batch, read once from its segment ids (B, Li) and (B, Lt):
    ``auto`` takes ``none`` for unpadded one-sample rows, else ``flex`` on CUDA and
    ``segment`` elsewhere."""
    segments = torch.cat([img_segment_ids, txt_segment_ids], dim=1)  # (B, L)
    image_len = img_segment_ids.shape[1]
    if segments.is_meta:
        return AttentionPlan("dense", image_len, segment_mask(segments))
    if kernel == "auto":
        if bool((segments == 0).all()):
            return AttentionPlan("none", image_len)
        kernel = "flex" if segments.is_cuda else "segment"
    if kernel == "flex":
        return AttentionPlan("flex", image_len, _block_mask(segments, segments.shape[1]),
                             _block_mask(segments, image_len))
    if kernel == "segment":
        return AttentionPlan("segment", image_len, segment_index(segments))
    return AttentionPlan("dense", image_len, segment_mask(segments))


@functools.cache
def _compiled_flex() -> Any:
    """FlexAttention compiled once per process: its fused kernel. Shapes are left dynamic:
    rows of every bucket and caption length must not each cost a recompile."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def attend(q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan) -> Tensor:
    """q (B, H, Lq, D) over k, v (B, H, L, D) -> (B, H, Lq, D); Lq is the whole row, or the
    image tokens alone (the last block)."""
    image_only = q.shape[2] == plan.image_len != k.shape[2]
    if plan.kind == "none":
        return F.scaled_dot_product_attention(q, k, v)
    if plan.kind == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        # Inside torch.compile the enclosing graph fuses it; eager on the CPU (tests) it runs
        # unfused; eager on CUDA it takes the compiled kernel.
        fused = q.is_cuda and not torch.compiler.is_compiling()
        kernel = _compiled_flex() if fused else flex_attention
        return kernel(q, k, v, block_mask=plan.image if image_only else plan.full)
    if plan.kind == "segment":
        return segment_attention(q, k, v, plan.full)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.full[:, :, :q.shape[2]])
