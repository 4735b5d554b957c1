"""Sequence packing: mixed-resolution samples share one fixed token budget per batch.

Two halves:
1. *Which* samples go together: ``pack_by_tokens`` packs per-sample token counts into bins of
   at most ``budget`` tokens by minimum bin slack: each bin opens with the largest sample left
   (ties: lowest index) and takes the remaining samples whose token sum fills it the most (an
   exact subset sum over the few distinct token counts). On the paper's 27 buckets with a
   24576 budget it needs ceil(tokens / budget) bins or one more, where first-fit decreasing
   left 1-2% padding in a pool of 1024; what padding remains is mostly in a pool's last bin.
2. *How* they sit in one sequence: ``pack_tokens`` concatenates each sample's (N_i, C) tokens
   into one (budget, C) sequence and records a ``PackedSequence`` (segment ids, 3-axis
   position ids restarting per sample). ``attention_mask`` turns segment ids into a
   block-diagonal mask, so attention over the packed sequence computes exactly what each
   sample computes alone.

Opening each bin with the largest sample puts samples of similar size together, so most bins
hold one base resolution with smaller samples in the gaps. That matches the paper's per-GPU
batches (24 / 10 / 6 samples at 512 / 768 / 1024 base): each packed batch is about one GPU's
share, and the global batch mixes resolutions across GPUs and steps.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

from lens_model.buckets import Bucket


def pack_by_tokens(token_counts: list[int], budget: int) -> list[list[int]]:
    """Sample indices grouped into bins of <= ``budget`` tokens (minimum bin slack, see doc)."""
    if budget <= 0:
        raise ValueError(f"token budget must be > 0, got {budget}")
    for i, n in enumerate(token_counts):
        if n > budget:
            raise ValueError(
                f"sample {i} has {n} tokens, over the token budget of {budget}; "
                f"raise loader.token_budget to at least {n}")
        if n <= 0:
            raise ValueError(f"sample {i} has {n} tokens; every sample needs at least 1 token")
    groups: dict[int, deque[int]] = {}  # token count -> sample indices, ascending
    for i, n in enumerate(token_counts):
        groups.setdefault(n, deque()).append(i)
    bins: list[list[int]] = []
    while groups:
        first = _take(groups, max(groups), 1)
        bins.append(first + _fill(groups, budget - token_counts[first[0]]))
    return bins


def _take(groups: dict[int, deque[int]], size: int, count: int) -> list[int]:
    """Pop the ``count`` lowest indices of token count ``size``."""
    out = [groups[size].popleft() for _ in range(count)]
    if not groups[size]:
        del groups[size]
    return out


def _fill(groups: dict[int, deque[int]], room: int) -> list[int]:
    """Take the samples whose token sum is the largest that fits ``room`` (exact subset sum).

    Bit t of ``reach[j]`` says a sum of t is reachable with the j largest sizes; sums are
    bounded by ``room``, and each size is used at most as often as it has samples.
    """
    sizes = sorted(groups, reverse=True)
    mask = (1 << (room + 1)) - 1
    reach = [1]
    for s in sizes:
        prev, acc = reach[-1], reach[-1]
        for m in range(1, min(len(groups[s]), room // s) + 1):
            acc |= prev << (m * s)
        reach.append(acc & mask)
    total = reach[-1].bit_length() - 1
    chosen: list[int] = []
    for j in range(len(sizes) - 1, -1, -1):  # walk back, fewest copies of the smaller sizes
        m = 0
        while not (reach[j] >> (total - m * sizes[j])) & 1:
            m += 1
        total -= m * sizes[j]
        if m:
            chosen += _take(groups, sizes[j], m)
    return chosen


def padding_fraction(bins: list[list[int]], token_counts: list[int], budget: int) -> float:
    """Padding tokens / all token slots when every bin is one sequence of ``budget`` slots."""
    slots = len(bins) * budget
    used = sum(token_counts[i] for b in bins for i in b)
    return (slots - used) / slots if slots else 0.0


def padding_fraction_pad_to_max(token_counts: list[int], batch_size: int) -> float:
    """Padding if consecutive batches of ``batch_size`` samples are padded to their largest."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    slots = used = 0
    for start in range(0, len(token_counts), batch_size):
        batch = token_counts[start:start + batch_size]
        slots += len(batch) * max(batch)
        used += sum(batch)
    return (slots - used) / slots if slots else 0.0


def packing_report(token_counts: list[int], budget: int, batch_size: int | None = None) -> dict:
    """Packed vs pad-to-max padding for one pool of samples (for bench/).

    The pad-to-max baseline uses ``batch_size`` samples per batch; by default as many as fit
    the budget at the largest sample, i.e. the fixed batch a bucket-less loader must use.
    """
    bins = pack_by_tokens(token_counts, budget)
    batch_size = batch_size or max(1, budget // max(token_counts))
    return {
        "samples": len(token_counts),
        "budget": budget,
        "bins": len(bins),
        "mean_samples_per_bin": len(token_counts) / len(bins),
        "packed_padding": padding_fraction(bins, token_counts, budget),
        "pad_to_max_batch_size": batch_size,
        "pad_to_max_padding": padding_fraction_pad_to_max(token_counts, batch_size),
    }


# Aspect weights of a photo-like mix: square and 4:3 / 3:2 common, extremes rare.
PHOTO_ASPECT_WEIGHTS = {"1:1": 0.30, "4:3": 0.15, "3:4": 0.15, "3:2": 0.10, "2:3": 0.10,
                        "16:9": 0.07, "9:16": 0.07, "2:1": 0.03, "1:2": 0.03}


def mixed_bucket_tokens(buckets: list[Bucket], token_px: int, n: int, seed: int,
                        aspect_weights: dict[str, float] | None = None) -> list[int]:
    """Token counts of ``n`` samples drawn over ``buckets``: bases uniform, aspects weighted.

    ``aspect_weights`` maps "W:H" ratios to weights (each bucket takes the nearest ratio's
    weight); None draws buckets uniformly.
    """
    weights = [1.0] * len(buckets)
    if aspect_weights:
        ratios = {r: math.log(int(r.split(":")[0]) / int(r.split(":")[1])) for r in aspect_weights}
        nearest = [min(ratios, key=lambda r: abs(ratios[r] - math.log(b.aspect))) for b in buckets]
        weights = [aspect_weights[r] for r in nearest]
    rng = random.Random(seed)
    return [b.tokens(token_px) for b in rng.choices(buckets, weights=weights, k=n)]


@dataclass
class PackedSequence:
    """Where each sample sits in a packed sequence of length L."""

    segment_ids: Tensor  # (L,) long: sample index, -1 for padding
    position_ids: Tensor  # (L, 3) long: (frame/text index, row, column), per sample from 0
    lengths: list[int]  # tokens of each sample, in order
    grids: list[tuple[int, int]]  # (rows, cols) of each sample


def pack_tokens(tokens: list[Tensor], grids: list[tuple[int, int]],
                budget: int) -> tuple[Tensor, PackedSequence]:
    """Concatenate per-sample (N_i, C) tokens (row-major over (h, w) grids) into (budget, C)."""
    if len(tokens) != len(grids):
        raise ValueError(f"{len(tokens)} token tensors but {len(grids)} grids; pass one each")
    for i, (t, (h, w)) in enumerate(zip(tokens, grids, strict=True)):
        if t.ndim != 2 or t.shape[0] != h * w:
            raise ValueError(f"sample {i}: tokens of shape {tuple(t.shape)} do not match grid "
                             f"{h}x{w}; expected ({h * w}, C)")
    lengths = [h * w for h, w in grids]
    total = sum(lengths)
    if total > budget:
        raise ValueError(f"{len(tokens)} samples hold {total} tokens, over the budget of "
                         f"{budget}; pack fewer samples (pack_by_tokens) or raise the budget")
    channels = tokens[0].shape[1] if tokens else 0
    dtype = tokens[0].dtype if tokens else torch.float32
    dev = tokens[0].device if tokens else None  # packed where the tokens are: no round trip
    packed = torch.zeros(budget, channels, dtype=dtype, device=dev)
    segment_ids = torch.full((budget,), -1, dtype=torch.long, device=dev)
    position_ids = torch.zeros(budget, 3, dtype=torch.long, device=dev)
    start = 0
    for i, (t, (h, w)) in enumerate(zip(tokens, grids, strict=True)):
        end = start + h * w
        packed[start:end] = t
        segment_ids[start:end] = i
        position_ids[start:end, 1] = torch.arange(h, device=dev).repeat_interleave(w)
        position_ids[start:end, 2] = torch.arange(w, device=dev).repeat(h)
        start = end
    return packed, PackedSequence(segment_ids, position_ids, lengths, list(grids))


def unpack(packed: Tensor, seq: PackedSequence) -> list[Tensor]:
    """Per-sample (N_i, ...) slices of a packed (L, ...) tensor, padding dropped."""
    return list(packed[:sum(seq.lengths)].split(seq.lengths))


def attention_mask(segment_ids: Tensor) -> Tensor:
    """(L, L) bool, True where query i may attend key j: same sample; padding sees only itself.

    Every row has at least one True, so ``scaled_dot_product_attention`` never softmaxes an
    all-masked row into NaN.
    """
    same = segment_ids[:, None] == segment_ids[None, :]
    real = segment_ids >= 0
    eye = torch.eye(len(segment_ids), dtype=torch.bool, device=segment_ids.device)
    return (same & real[:, None]) | eye
