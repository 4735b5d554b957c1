"""Packed-row attention: FlexAttention's document mask and the segment kernel compute what the
dense block-diagonal reference computes, and a block runs as one graph with no host sync."""

from __future__ import annotations

import pytest
import torch

from lens_model.attention import plan_attention
from lens_model.packing import pack_tokens
from lens_model.transformer import JointBlock, LensTransformer2DModel, pack_text, rope_angles


def _model() -> LensTransformer2DModel:
    torch.manual_seed(0)
    model = LensTransformer2DModel(depth=2, width=32, heads=2, mlp_hidden=64, in_channels=4,
                                   axes_dims=(4, 6, 6))
    for p in model.parameters():  # leave adaLN-zero, so the outputs are not trivially zero
        torch.nn.init.normal_(p, std=0.05)
    return model


def _rows() -> tuple[torch.Tensor, ...]:
    """Two packed rows: three images of mixed sizes with their captions and padding after
    both; and a CFG pair, one image with its prompt beside the same image with the empty
    (negative) prompt, which has no text tokens at all."""
    torch.manual_seed(1)
    rows = []
    for grids, words in (([(2, 3), (4, 4), (3, 2)], [3, 5, 2]), ([(4, 3), (4, 3)], [6, 0])):
        img, seq = pack_tokens([torch.randn(h * w, 16) for h, w in grids], grids, budget=40)
        txt, txt_seg, txt_pos = pack_text([torch.randn(n, 32) for n in words], budget=12)
        rows.append((img, txt, seq.segment_ids, txt_seg, seq.position_ids, txt_pos))
    img, txt, iseg, tseg, ipos, tpos = (torch.stack(parts) for parts in zip(*rows, strict=True))
    t = torch.rand(2, 3)  # the second row has two samples: its third timestep is unused
    return img, txt, t, iseg, tseg, ipos, tpos


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kernel", ["flex", "segment"])
def test_packed_kernels_equal_the_dense_reference(kernel: str) -> None:
    model, args = _model(), _rows()
    with torch.no_grad():  # FlexAttention has no CPU backward (torch 2.13)
        want = model(*args, attention=plan_attention(args[3], args[4], "dense"))
        got = model(*args, attention=plan_attention(args[3], args[4], kernel))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_an_unpadded_one_sample_row_takes_plain_attention() -> None:
    segments = torch.zeros(1, 12, dtype=torch.long)
    assert plan_attention(segments, segments[:, :4]).kind == "none"
    padded = torch.cat([segments, torch.full((1, 2), -1)], dim=1)
    assert plan_attention(padded, segments[:, :4]).kind == "segment"  # the CPU's default


@pytest.mark.parametrize("kernel", ["flex", "dense"])
@pytest.mark.parametrize("last", [False, True])
def test_a_block_compiles_as_one_graph(kernel: str, last: bool) -> None:
    """fullgraph=True fails on any graph break, a read back to the host included."""
    torch._dynamo.reset()
    model = _model()
    block = model.blocks[-1 if last else 0]
    assert isinstance(block, JointBlock) and block.txt.pre_only == last
    img, txt, t, iseg, tseg, ipos, tpos = _rows()
    cfg = model.transformer_config
    x, c = model.img_in(img), model.txt_in(txt)
    temb = torch.nn.functional.silu(model.time_mlp(
        torch.randn(2, 3, 256)))  # any (B, S, W) embedding will do
    cos, sin = rope_angles(torch.cat([ipos, tpos], dim=1), cfg.axes_dims, cfg.rope_theta)
    args = (x, c, temb, iseg.clamp(min=0), tseg.clamp(min=0), cos, sin,
            plan_attention(iseg, tseg, kernel))
    with torch.no_grad():
        want = block(*args)
        got = torch.compile(block, fullgraph=True, backend="eager")(*args)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    assert (got[1] is None) == last


def test_per_segment_modulation_grads_match_a_per_token_gather() -> None:
    """The broadcast kept per segment gives the gradients the gathered per-token copy gives."""
    from lens_model.transformer import _gated, _modulate

    torch.manual_seed(2)
    x, h = torch.randn(2, 7, 5, requires_grad=True), torch.randn(2, 7, 5, requires_grad=True)
    shift, scale, gate = (torch.randn(2, 3, 5, requires_grad=True) for _ in range(3))
    index = torch.tensor([[0, 0, 1, 1, 1, 2, 0], [2, 2, 2, 0, 0, 0, 0]])

    def per_token(m: torch.Tensor) -> torch.Tensor:
        return m.gather(1, index[..., None].expand(-1, -1, 5))

    leaves = (x, h, shift, scale, gate)
    out = _gated(_modulate(x, shift, scale, index), gate, h, index)
    got = torch.autograd.grad(out.square().sum(), leaves)
    ref = (x * (1 + per_token(scale)) + per_token(shift)) + per_token(gate) * h
    want = torch.autograd.grad(ref.square().sum(), leaves)
    torch.testing.assert_close(out, ref)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
