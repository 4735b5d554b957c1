"""Packing: bin packing of token counts, the packed layout, and packed == per-sample attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lens_model.buckets import make_buckets
from lens_model.packing import (
    PHOTO_ASPECT_WEIGHTS,
    attention_mask,
    mixed_bucket_tokens,
    pack_by_tokens,
    pack_tokens,
    packing_report,
    padding_fraction,
    padding_fraction_pad_to_max,
    unpack,
)
from lens_model.recipe import ASPECT_RATIOS_1_2_TO_2_1


def test_pack_by_tokens_small_cases() -> None:
    assert pack_by_tokens([5, 5, 5, 5], 10) == [[0, 1], [2, 3]]
    assert pack_by_tokens([4, 4, 4], 8) == [[0, 1], [2]]  # ties go by index
    assert pack_by_tokens([6, 4, 3, 7], 10) == [[3, 2], [0, 1]]
    # First-fit decreasing needs 3 bins here ([5, 4], [3, 3, 3], [2]); an exact fill needs 2.
    bins = pack_by_tokens([5, 4, 3, 3, 3, 2], 10)
    assert len(bins) == 2 and sorted(i for b in bins for i in b) == list(range(6))
    assert pack_by_tokens([], 10) == []


def test_pack_by_tokens_over_budget_names_sample() -> None:
    with pytest.raises(ValueError, match=r"sample 2 has 11 tokens.*budget of 10.*token_budget"):
        pack_by_tokens([3, 4, 11], 10)


def test_padding_fractions_closed_form() -> None:
    assert padding_fraction([[0, 1], [2]], [4, 4, 4], 8) == pytest.approx(0.25)  # 4 / 16
    # batches [1, 3] -> 2 x 3 slots, 4 used; [2, 2] -> 4 slots, 4 used: 2 / 10 padding
    assert padding_fraction_pad_to_max([1, 3, 2, 2], 2) == pytest.approx(0.2)


@pytest.mark.parametrize("weights", [None, PHOTO_ASPECT_WEIGHTS], ids=["uniform", "photo"])
def test_paper_buckets_pack_within_two_percent(weights: dict | None) -> None:
    buckets = make_buckets([512, 768, 1024], ASPECT_RATIOS_1_2_TO_2_1, 32)
    assert len(buckets) == 27
    for seed in range(4):
        counts = mixed_bucket_tokens(buckets, 16, 1024, seed, weights)
        bins = pack_by_tokens(counts, 24576)
        assert sorted(i for b in bins for i in b) == list(range(1024))
        assert all(sum(counts[i] for i in b) <= 24576 for b in bins)
        assert len(bins) <= math.ceil(sum(counts) / 24576) + 1
        report = packing_report(counts, 24576)
        assert report["packed_padding"] <= 0.02
        assert report["pad_to_max_batch_size"] == 5  # 24576 // 4232, the 1:2 bucket at 1024^2
        assert report["pad_to_max_padding"] > 0.2
        assert pack_by_tokens(counts, 24576) == bins  # deterministic


def test_pack_tokens_layout_and_unpack() -> None:
    tokens = [torch.randn(6, 4), torch.randn(2, 4)]
    packed, seq = pack_tokens(tokens, [(2, 3), (1, 2)], budget=10)
    assert packed.shape == (10, 4) and torch.all(packed[8:] == 0)
    assert seq.segment_ids.tolist() == [0] * 6 + [1] * 2 + [-1] * 2
    assert seq.position_ids.tolist() == [
        [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2],
        [0, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]]
    assert seq.lengths == [6, 2]
    for a, b in zip(unpack(packed, seq), tokens, strict=True):
        assert torch.equal(a, b)


def test_pack_tokens_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"sample 1.*grid 2x2"):
        pack_tokens([torch.zeros(2, 3), torch.zeros(5, 3)], [(1, 2), (2, 2)], budget=10)
    with pytest.raises(ValueError, match="over the budget of 5"):
        pack_tokens([torch.zeros(6, 3)], [(2, 3)], budget=5)


def test_attention_mask_blocks() -> None:
    mask = attention_mask(torch.tensor([0, 0, 1, -1, -1]))
    expected = torch.tensor([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


# A small attention model: linear embed, blocks of LN -> SDPA with 2-axis RoPE -> MLP.

def rope_2d(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate the first half of head dims by row, the second half by column. x (H, L, D)."""
    half = x.shape[-1] // 2
    out = []
    for axis, part in ((1, x[..., :half]), (2, x[..., half:])):
        freqs = 1.0 / (100.0 ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
        angle = pos[:, axis, None].float() * freqs  # (L, half / 2)
        cos, sin = angle.cos(), angle.sin()
        a, b = part[..., 0::2], part[..., 1::2]
        out.append(torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2))
    return torch.cat(out, dim=-1)


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor, pos: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        L, C = x.shape
        qkv = self.qkv(self.norm1(x)).view(L, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(1, 2, 0, 3)  # (H, L, D) each
        q, k = rope_2d(q, pos), rope_2d(k, pos)  # (H, L, D)
        attn = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]
        x = x + self.proj(attn.transpose(0, 1).reshape(L, C))
        return x + self.mlp(self.norm2(x))


class TinyModel(nn.Module):
    def __init__(self, channels: int = 6, width: int = 32, heads: int = 2, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(channels, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, channels)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, pos, mask)
        return self.head(self.norm(h))


GRIDS = [(3, 5), (4, 4), (2, 8)]


def _grid_positions(h: int, w: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.zeros(h * w, dtype=torch.long), rows.flatten(), cols.flatten()], 1)


def _model_and_samples() -> tuple[TinyModel, list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = TinyModel().eval()
    tokens = [torch.randn(h * w, 6) for h, w in GRIDS]
    with torch.no_grad():
        alone = [model(t, _grid_positions(h, w)) for t, (h, w) in zip(tokens, GRIDS, strict=True)]
    return model, tokens, alone


def test_packed_attention_equals_per_sample() -> None:
    model, tokens, alone = _model_and_samples()
    packed, seq = pack_tokens(tokens, GRIDS, budget=64)  # 47 tokens + 17 padding
    with torch.no_grad():
        out = model(packed, seq.position_ids, attention_mask(seq.segment_ids))
    assert torch.isfinite(out).all()  # padding rows too
    for got, want in zip(unpack(out, seq), alone, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_wrong_mask_or_positions_change_outputs() -> None:
    model, tokens, alone = _model_and_samples()
    packed, seq = pack_tokens(tokens, GRIDS, budget=64)
    full = torch.ones(64, 64, dtype=torch.bool)  # samples see each other and the padding
    sees_padding = attention_mask(seq.segment_ids) | (seq.segment_ids < 0)[None, :]
    running = seq.position_ids.clone()
    running[:, 2] = torch.arange(64)  # columns that do not restart per sample
    cases = [(seq.position_ids, full), (seq.position_ids, sees_padding),
             (running, attention_mask(seq.segment_ids))]
    for pos, mask in cases:
        with torch.no_grad():
            parts = unpack(model(packed, pos, mask), seq)
        worst = max((g - w).abs().max().item() for g, w in zip(parts, alone, strict=True))
        assert worst > 1e-3
