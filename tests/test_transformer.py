"""LensTransformer2DModel: packed == per-sample, adaLN-zero, save/load, checkpointing, RoPE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lens_model.attention import segment_mask
from lens_model.config import PRESETS, TransformerConfig, get_preset
from lens_model.packing import pack_tokens, unpack
from lens_model.transformer import (
    LensTransformer2DModel,
    apply_rope,
    pack_text,
    patchify,
    rope_angles,
    unpatchify,
)

# Small but complete: 2 blocks (one full, one with a pre-only text stream), head dim 24 over
# RoPE axes (8, 8, 8), and text_dim != width so the text input projection is exercised.
SMALL = dict(depth=2, width=48, heads=2, mlp_hidden=96, in_channels=4, axes_dims=(8, 8, 8),
             text_dim=32)
C = SMALL["in_channels"]


def _model(seed: int = 0, randomise: bool = True, **kw) -> LensTransformer2DModel:
    """A seeded small model; ``randomise`` moves it off adaLN-zero so every weight matters."""
    torch.manual_seed(seed)
    model = LensTransformer2DModel.from_preset("tiny", **{**SMALL, **kw}).eval()
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def _sample(grid: tuple[int, int], text_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (C, 2h, 2w) latent for an h x w token grid and (text_len, 32) text features."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    return torch.randn(C, 2 * h, 2 * w, generator=g), torch.randn(text_len, 32, generator=g)


def _unpacked(model: LensTransformer2DModel, latent: torch.Tensor, text: torch.Tensor,
              t: float) -> torch.Tensor:
    mask = torch.ones(1, text.shape[0], dtype=torch.bool)
    return model.forward_unpacked(latent[None], text[None], mask, torch.tensor([t]))[0]


def _inputs(model: LensTransformer2DModel, grid: tuple[int, int] = (3, 4), text_len: int = 5,
            batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, C, 2 * grid[0], 2 * grid[1], generator=g)
    text = torch.randn(batch, text_len, model.transformer_config.text_dim, generator=g)
    return latents, text, torch.ones(batch, text_len, dtype=torch.bool), torch.rand(batch,
                                                                                  generator=g)


GRIDS = [(2, 3), (4, 4), (3, 2)]
TEXT_LENS = [3, 5, 2]
TIMES = [0.2, 0.5, 0.9]


def _samples() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [_sample(g, n, seed=i) for i, (g, n) in enumerate(zip(GRIDS, TEXT_LENS, strict=True))]


def _packed_rows(samples: list) -> tuple[list, tuple[torch.Tensor, ...]]:
    """Samples 0 and 1 packed in row 0, sample 2 in row 1, both rows padded."""
    rows = [[0, 1], [2]]
    img, txt, iseg, tseg, ipos, tpos, seqs = [], [], [], [], [], [], []
    for row in rows:
        tokens, seq = pack_tokens([patchify(samples[i][0]) for i in row],
                                  [GRIDS[i] for i in row], budget=24)
        feats, segs, pos = pack_text([samples[i][1] for i in row], budget=10)
        img.append(tokens), iseg.append(seq.segment_ids), ipos.append(seq.position_ids)
        txt.append(feats), tseg.append(segs), tpos.append(pos), seqs.append(seq)
    t = torch.tensor([[TIMES[0], TIMES[1]], [TIMES[2], 0.0]])
    batch = (torch.stack(img), torch.stack(txt), t, torch.stack(iseg), torch.stack(tseg),
             torch.stack(ipos), torch.stack(tpos))
    return seqs, batch


@pytest.mark.parametrize("pooled", [False, True])
def test_packed_forward_equals_per_sample_and_needs_the_mask(pooled: bool) -> None:
    model = _model(pooled_text=pooled)
    samples = _samples()
    seqs, batch = _packed_rows(samples)
    with torch.no_grad():
        packed = model(*batch)  # (2, 24, 16)
        refs = [_unpacked(model, lat, txt, t) for (lat, txt), t in zip(samples, TIMES, strict=True)]
    assert packed.shape == (2, 24, 4 * C) and torch.isfinite(packed).all()
    outs = unpack(packed[0], seqs[0]) + unpack(packed[1], seqs[1])
    for i, (out, ref) in enumerate(zip(outs, refs, strict=True)):
        h, w = GRIDS[i]
        got = unpatchify(out, C, 2 * h, 2 * w)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"sample {i}")

    # Wrong mask: row 0's two samples attend to each other (one segment, sample 0's timestep).
    img, txt, t, iseg, tseg, ipos, tpos = batch
    merged_i, merged_t = iseg.clone(), tseg.clone()
    merged_i[0][merged_i[0] == 1] = 0
    merged_t[0][merged_t[0] == 1] = 0
    with torch.no_grad():
        wrong = model(img, txt, t, merged_i, merged_t, ipos, tpos)
        ref1 = _unpacked(model, *samples[1], TIMES[0])  # sample 1 alone at the same timestep
    got1 = unpatchify(unpack(wrong[0], seqs[0])[1], C, 8, 8)
    assert (got1 - ref1).abs().max() > 1e-3


def test_each_segment_is_modulated_by_its_own_timestep() -> None:
    model = _model()
    samples = _samples()
    seqs, batch = _packed_rows(samples)
    swapped = batch[2].clone()
    swapped[0] = swapped[0].flip(0)  # row 0: samples 0 and 1 trade timesteps
    with torch.no_grad():
        a, b = model(*batch), model(batch[0], batch[1], swapped, *batch[3:])
        ref0 = _unpacked(model, *samples[0], TIMES[1])
    torch.testing.assert_close(a[1], b[1], atol=0, rtol=0)  # row 1 untouched
    got0 = unpatchify(unpack(b[0], seqs[0])[0], C, 4, 6)
    torch.testing.assert_close(got0, ref0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooled", [False, True])
def test_text_padding_is_ignored(pooled: bool) -> None:
    model = _model(pooled_text=pooled)
    latents, text, mask, t = _inputs(model, text_len=6)
    mask[0, 4:] = False  # right padding
    mask[1, :2] = False  # left padding: text positions count real tokens only
    junk = text.clone()
    junk[~mask] = 100.0 * torch.randn_like(junk[~mask])
    with torch.no_grad():
        a = model.forward_unpacked(latents, text, mask, t)
        b = model.forward_unpacked(latents, junk, mask, t)
        short0 = model.forward_unpacked(latents[:1], text[:1, :4], mask[:1, :4], t[:1])
        short1 = model.forward_unpacked(latents[1:], text[1:, 2:], mask[1:, 2:], t[1:])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(a[:1], short0, atol=1e-5, rtol=0)
    torch.testing.assert_close(a[1:], short1, atol=1e-5, rtol=0)


def test_segment_mask_closed_form() -> None:
    got = segment_mask(torch.tensor([[0, 0, 1, -1, -1]]))[0, 0].int()
    expected = torch.tensor([[1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [0, 0, 1, 0, 0],
                             [0, 0, 0, 1, 0],  # padding sees itself only
                             [0, 0, 0, 0, 1]])
    assert torch.equal(got, expected)


def test_positions_act_through_rope_relatively() -> None:
    model = _model()
    lat, feats = _samples()[1]  # a 4 x 4 grid, 5 text tokens
    tokens, seq = pack_tokens([patchify(lat)], [GRIDS[1]], budget=16)
    text, tseg, tpos = pack_text([feats], budget=5)
    img, iseg, ipos = tokens[None], seq.segment_ids[None], seq.position_ids[None]
    txt_b, tseg, tpos, t = text[None], tseg[None], tpos[None], torch.tensor([[0.4]])
    with torch.no_grad():
        base = model(img, txt_b, t, iseg, tseg, ipos, tpos)
        for axis in range(3):  # one shift of every position on an axis: RoPE is relative
            shift = torch.zeros(3, dtype=torch.long)
            shift[axis] = 5
            moved = model(img, txt_b, t, iseg, tseg, ipos + shift, tpos + shift)
            torch.testing.assert_close(moved, base, atol=1e-5, rtol=0, msg=f"axis {axis}")
        flipped = ipos.clone()
        flipped[..., 1] = flipped[..., 1].max() - flipped[..., 1]  # image upside down
        upside = model(img, txt_b, t, iseg, tseg, flipped, tpos)
    assert (upside - base).abs().max() > 1e-3


def test_output_is_zero_at_init_and_moves_after_one_step() -> None:
    model = _model(randomise=False).train()
    latents, text, mask, t = _inputs(model)
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda _, args, out: seen.append((args[:2], out)))
    out = model.forward_unpacked(latents, text, mask, t)
    assert out.shape == latents.shape and torch.count_nonzero(out) == 0
    for (x, c), (x_out, c_out) in seen:  # adaLN-zero: every gate is 0, each block the identity
        assert torch.equal(x_out, x) and (c_out is None or torch.equal(c_out, c))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    F.mse_loss(out, torch.randn_like(out)).backward()
    opt.step()
    with torch.no_grad():
        assert model.forward_unpacked(latents, text, mask, t).abs().min() > 0


@pytest.mark.parametrize("pooled", [False, True])
def test_every_parameter_gets_a_gradient(pooled: bool) -> None:
    model = _model(pooled_text=pooled).train()
    latents, text, mask, t = _inputs(model)
    model.forward_unpacked(latents, text, mask, t).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


@pytest.mark.parametrize("pooled", [False, True])
def test_save_load_round_trip(tmp_path, pooled: bool) -> None:
    model = _model(pooled_text=pooled)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = LensTransformer2DModel.from_pretrained(tmp_path).eval()
    assert loaded.transformer_config == model.transformer_config
    inputs = _inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded.forward_unpacked(*inputs), model.forward_unpacked(*inputs))


def test_gradient_checkpointing_same_loss_and_grads() -> None:
    model = _model().train()
    inputs = _inputs(model)
    calls = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = model.forward_unpacked(*inputs).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = loss_and_grads()
    assert len(calls) == len(model.blocks)
    model.enable_gradient_checkpointing()
    calls.clear()
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert len(calls) == 2 * len(model.blocks)  # each block recomputed in backward
    torch.testing.assert_close(loss_ckpt, loss, atol=0, rtol=0)
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, atol=1e-7, rtol=1e-6, msg=name)


def test_parameter_counts_on_meta() -> None:
    with torch.device("meta"):
        full = LensTransformer2DModel.from_preset("lens-3.8b")
        toy = LensTransformer2DModel.from_preset("toy")
    n = sum(p.numel() for p in full.parameters())
    mods = [full.final_mod] + [s.mod for b in full.blocks for s in (b.img, b.txt)]
    adaln = sum(p.numel() for m in mods for p in m.parameters())
    assert n == 4_054_107_200 and 3.7e9 <= n <= 4.2e9
    assert n - adaln == 2_698_989_632  # the paper's "about 2.7e9 without adaLN"
    assert sum(p.numel() for p in toy.parameters()) == 1_164_614_208  # Lens-Toy's ~1.2e9


def test_rope_depends_only_on_relative_position() -> None:
    axes, d = (8, 8, 8), 24
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, d, generator=g), torch.randn(1, 1, 1, d, generator=g)

    def score(axis: int, pq: int, pk: int) -> float:
        pos_q, pos_k = torch.zeros(1, 1, 3, dtype=torch.long), torch.zeros(1, 1, 3,
                                                                         dtype=torch.long)
        pos_q[..., axis], pos_k[..., axis] = pq, pk
        rq = apply_rope(q, *rope_angles(pos_q, axes, 10000.0))
        rk = apply_rope(k, *rope_angles(pos_k, axes, 10000.0))
        return float((rq * rk).sum())

    for axis in range(3):
        base = score(axis, 5, 2)
        for shift in (1, 7, 40):
            assert score(axis, 5 + shift, 2 + shift) == pytest.approx(base, abs=1e-4)
        assert abs(score(axis, 5, 3) - base) > 1e-3  # a different offset scores differently
    # Rotation keeps norms; position 0 is the identity.
    zero = torch.zeros(1, 1, 3, dtype=torch.long)
    torch.testing.assert_close(apply_rope(q, *rope_angles(zero, axes, 10000.0)), q)


def test_patchify_layout_and_round_trip() -> None:
    latent = torch.randn(3, 6, 8)
    tokens = patchify(latent)
    assert tokens.shape == (12, 12)
    r, c = 1, 2  # token (row 1, col 2) of a 3 x 4 grid holds latent[:, 2:4, 4:6]
    torch.testing.assert_close(tokens[r * 4 + c], latent[:, 2:4, 4:6].reshape(-1))
    torch.testing.assert_close(unpatchify(tokens, 3, 6, 8), latent)
    batched = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(unpatchify(patchify(batched), 3, 4, 4), batched)
    with pytest.raises(ValueError, match="not divisible by patch size 2"):
        patchify(torch.randn(3, 5, 8))


def test_presets_and_config_validation() -> None:
    assert set(PRESETS) == {"tiny", "toy", "lens-3.8b"}
    full = get_preset("lens-3.8b")
    assert (full.depth, full.width, full.heads, full.head_dim, full.mlp_hidden) == (
        48, 1536, 24, 64, 4096)
    assert full.axes_dims == (8, 28, 28) and full.patch_dim == 128 and full.text_dim == 1536
    assert get_preset("tiny", width=96, axes_dims=(8, 8, 8)).text_dim == 96  # follows width
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*tiny, toy, lens-3.8b"):
        get_preset("huge")
    with pytest.raises(ValueError, match=r"unknown TransformerConfig field.*\['widht'\]"):
        get_preset("tiny", widht=64)
    with pytest.raises(ValueError, match="not divisible by heads"):
        TransformerConfig(depth=1, width=100, heads=3, mlp_hidden=8)
    with pytest.raises(ValueError, match="sum to 30 but the head dim is 32"):
        get_preset("tiny", axes_dims=(10, 10, 10))
    with pytest.raises(ValueError, match="must be positive and even"):
        get_preset("tiny", axes_dims=(6, 13, 13))


def test_bad_inputs_name_the_argument() -> None:
    model = _model()
    samples = _samples()
    _, batch = _packed_rows(samples)
    img, txt, t, iseg, tseg, ipos, tpos = batch
    with pytest.raises(ValueError, match=r"img_tokens has shape \(2, 24, 12\)"):
        model(img[..., :12], txt, t, iseg, tseg, ipos, tpos)
    with pytest.raises(ValueError, match="segment id 1 has no timestep"):
        model(img, txt, t[:, :1], iseg, tseg, ipos, tpos)
    with pytest.raises(ValueError, match=r"timestep must lie in \[0, 1\].*not 1000 t"):
        model(img, txt, t * 1000, iseg, tseg, ipos, tpos)


def test_segment_attention_equals_dense_mask_and_grads() -> None:
    """The sparse per-segment path computes what the dense block-diagonal mask computes."""
    from lens_model.packing import pack_tokens
    from lens_model.transformer import LensTransformer2DModel, pack_text

    torch.manual_seed(0)
    model = LensTransformer2DModel(depth=2, width=32, heads=2, mlp_hidden=64, in_channels=4,
                                   axes_dims=(4, 6, 6))
    for p in model.parameters():  # leave adaLN-zero so outputs are not trivially zero
        torch.nn.init.normal_(p, std=0.05)
    grids = [(2, 3), (4, 4), (3, 2)]
    img, seq = pack_tokens([torch.randn(h * w, 16) for h, w in grids], grids, budget=40)
    txt, txt_seg, txt_pos = pack_text([torch.randn(n, 32) for n in (3, 5, 2)], budget=12)
    t = torch.rand(1, 3)
    args = (img[None], txt[None], t, seq.segment_ids[None], txt_seg[None],
            seq.position_ids[None], txt_pos[None])
    sparse = model(*args)
    sparse.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.attention_kernel = "dense"
    dense = model(*args)
    dense.square().sum().backward()
    assert torch.allclose(sparse, dense, atol=1e-5)
    for g, p in zip(grads, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-5)
