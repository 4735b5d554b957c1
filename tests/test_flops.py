"""Analytic FLOPs, parameters and memory: hand counts, torch's FLOP counter, the real module."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lens_model.config import get_preset
from lens_model.flops import (
    forward_flops,
    info,
    memory_bytes,
    param_count,
    sample_flops,
    train_step_flops,
)
from lens_model.transformer import LensTransformer2DModel


def _counted_flops(model: LensTransformer2DModel, grid: tuple[int, int], text_len: int) -> int:
    """torch's own count of one unmasked single-sample forward (math SDPA, so bmm is seen)."""
    cfg = model.transformer_config
    p = cfg.patch_size
    latents = torch.zeros(1, cfg.in_channels, grid[0] * p, grid[1] * p)
    text = torch.zeros(1, text_len, cfg.text_dim)
    mask = torch.ones(1, text_len, dtype=torch.bool)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model.forward_unpacked(latents, text, mask, torch.tensor([0.5]))
    return fc.get_total_flops()


def test_one_block_tiny_matches_hand_count() -> None:
    cfg = get_preset("tiny", depth=1)  # width 128, SwiGLU 512, 8 latent channels -> 32/token
    n, t = 24, 5  # a 4 x 6 token grid, 5 text tokens
    hand = {
        "patch embedding": 2 * n * 32 * 128,
        "timestep MLP": 2 * (256 * 128 + 128 * 128),
        "image adaLN (6-way)": 2 * 128 * 6 * 128,
        "image QKV": 2 * n * 128 * 3 * 128,
        "image out": 2 * n * 128 * 128,
        "image SwiGLU": 2 * n * 128 * 2 * 512 + 2 * n * 512 * 128,
        "text adaLN (2-way, pre-only)": 2 * 128 * 2 * 128,
        "text KV (pre-only)": 2 * t * 128 * 2 * 128,
        "QK^T (image queries)": 2 * n * (n + t) * 128,
        "AV (image queries)": 2 * n * (n + t) * 128,
        "final adaLN": 2 * 128 * 2 * 128,
        "output projection": 2 * n * 128 * 32,
    }
    assert forward_flops(cfg, [n], [t]) == sum(hand.values()) == 14_086_144
    model = LensTransformer2DModel.from_preset("tiny", depth=1)
    assert _counted_flops(model, (4, 6), t) == sum(hand.values())


@pytest.mark.parametrize("overrides", [
    dict(depth=3),
    dict(depth=2, text_dim=96, qk_norm=False),
    dict(depth=2, pooled_text=True),
])
def test_matches_torch_flop_counter_on_the_real_module(overrides: dict) -> None:
    torch.manual_seed(0)
    model = LensTransformer2DModel.from_preset("tiny", **overrides)
    assert _counted_flops(model, (3, 5), 7) == forward_flops(model.transformer_config, [15], [7])


def test_lens_3_8b_at_1024_matches_torch_flop_counter_on_meta() -> None:
    with torch.device("meta"):
        model = LensTransformer2DModel.from_preset("lens-3.8b")
        latents, text = torch.zeros(1, 32, 128, 128), torch.zeros(1, 256, 1536)
        mask, t = torch.ones(1, 256, dtype=torch.bool), torch.full((1,), 0.5)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model.forward_unpacked(latents, text, mask, t)
    flops = forward_flops(model.transformer_config, [4096], [256])
    assert fc.get_total_flops() == flops == 17_400_955_404_288


def test_scaling() -> None:
    cfg = get_preset("tiny")
    n, t = 40, 12
    one = sample_flops(cfg, n, t)
    double = sample_flops(cfg, 2 * n, 2 * t)
    empty = sample_flops(cfg, 0, 0)
    assert double["attention"] == 4 * one["attention"]  # quadratic in tokens
    assert double["linear"] - one["linear"] == one["linear"] - empty["linear"]  # linear
    assert double["adaln"] == one["adaln"]  # once per sample, not per token
    # Samples add up; packing them is block-diagonal, cheaper than one long sequence.
    assert forward_flops(cfg, [n, 2 * n], [t, 2 * t]) == sum(one.values()) + sum(double.values())
    assert forward_flops(cfg, [n, n], [t, t]) < forward_flops(cfg, [2 * n], [2 * t])
    # Every block but the last costs the same.
    f = [forward_flops(get_preset("tiny", depth=d), [n], [t]) for d in (2, 3, 4)]
    assert f[2] - f[1] == f[1] - f[0] > 0
    assert train_step_flops(cfg, [n], [t]) == 3 * forward_flops(cfg, [n], [t])
    assert train_step_flops(cfg, [n], [t], recompute=True) == 4 * forward_flops(cfg, [n], [t])
    with pytest.raises(ValueError, match="2 image token counts but 1 text"):
        forward_flops(cfg, [n, n], [t])


@pytest.mark.parametrize("overrides", [{}, dict(text_dim=96, qk_norm=False), dict(depth=1),
                                       dict(pooled_text=True)])
def test_param_count_matches_module(overrides: dict) -> None:
    cfg = get_preset("tiny", **overrides)
    model = LensTransformer2DModel(**cfg.to_dict())
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())
    mods = [model.final_mod] + [s.mod for b in model.blocks for s in (b.img, b.txt)]
    adaln = sum(p.numel() for m in mods for p in m.parameters())
    assert param_count(cfg, adaln=False) == param_count(cfg) - adaln


@pytest.mark.parametrize("preset", ["toy", "lens-3.8b"])
def test_param_count_matches_module_at_scale(preset: str) -> None:
    with torch.device("meta"):
        model = LensTransformer2DModel.from_preset(preset)
    assert param_count(get_preset(preset)) == sum(p.numel() for p in model.parameters())


def test_memory_bytes() -> None:
    cfg = get_preset("tiny")
    n = param_count(cfg)
    bf16 = memory_bytes(cfg)
    assert bf16 == {"params": n, "weights": 2 * n, "grads": 2 * n, "adam": 12 * n,
                    "total": 16 * n}  # ZeRO's 16 bytes a parameter for mixed precision
    assert memory_bytes(cfg, weights_dtype_bytes=4)["total"] == 16 * n  # 4 + 4 + m, v
    assert memory_bytes(cfg, grads_bytes=4)["grads"] == 4 * n


def test_info_lens_3_8b_at_1024() -> None:
    out = info("lens-3.8b", 1024, 1024, text_tokens=256)
    assert out["image_tokens"] == 4096 and out["text_tokens"] == 256
    assert out["params"] == 4_054_107_200 and out["params_without_adaln"] == 2_698_989_632
    assert out["forward_flops"] == forward_flops(get_preset("lens-3.8b"), [4096], [256])
    assert out["train_step_flops"] == 3 * out["forward_flops"]
    assert out["memory_bytes"]["total"] == 16 * out["params"]
    assert json.loads(json.dumps(out)) == json.loads(json.dumps(out))  # JSON-ready
    assert info("tiny", 64, 32, text_tokens=20, token_px=8)["image_tokens"] == 32
    with pytest.raises(ValueError, match="1000x1024 must be positive multiples of token_px 16"):
        info("lens-3.8b", 1000, 1024)
    with pytest.raises(ValueError, match="unknown model preset"):
        info("lens-9b", 1024, 1024)
