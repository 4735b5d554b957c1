"""The memory plan's arithmetic against what autograd really keeps, and the plans it prints."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.utils.checkpoint as cp

from lens_model.memory_plan import Tokens, plan, saved_bytes
from lens_model.recipe import load_recipe
from lens_model.transformer import LensTransformer2DModel, image_position_ids


def _measured(model: LensTransformer2DModel, sides: list[int], text: int) -> int:
    """Bytes of the tensors autograd saves (each storage once; parameters, and the dense
    reference mask a GPU's document mask replaces, left out) for one packed row of square
    images of ``sides`` tokens a side, ``text`` tokens each."""
    cfg = model.transformer_config
    img_seg = torch.cat([torch.full((s * s,), i) for i, s in enumerate(sides)])[None]
    txt_seg = torch.arange(len(sides)).repeat_interleave(text)[None]
    img_pos = torch.cat([image_position_ids(s, s) for s in sides])[None]
    txt_pos = torch.zeros(1, text * len(sides), 3, dtype=torch.long)
    txt_pos[..., 0] = torch.arange(text).repeat(len(sides))
    length = img_seg.shape[1] + txt_seg.shape[1]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storage = x.untyped_storage()
        mask = x.dim() == 4 and x.shape[1] == 1 and x.shape[-1] == length
        if storage.data_ptr() not in params and not mask:
            kept[storage.data_ptr()] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(torch.randn(1, img_seg.shape[1], cfg.patch_dim),
              torch.randn(1, txt_seg.shape[1], cfg.text_dim), torch.rand(1, len(sides)),
              img_seg, txt_seg, img_pos, txt_pos)
    return sum(kept.values())


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("shape", [(2, 64, 256), (3, 96, 512)])
@pytest.mark.parametrize("sides", [[12], [8, 6, 10]])
def test_saved_bytes_match_autograd(shape: tuple[int, int, int], sides: list[int],
                                       checkpointing: bool) -> None:
    depth, width, hidden = shape
    model = LensTransformer2DModel(depth=depth, width=width, heads=width // 32,
                                   mlp_hidden=hidden)
    model.attention_kernel = "dense"  # keeps what FlexAttention keeps: q, k, v, output
    if checkpointing:
        model.gradient_checkpointing = True
        model._gradient_checkpointing_func = functools.partial(cp.checkpoint,
                                                               use_reentrant=False)
    text = 16
    tokens = Tokens(image=sum(s * s for s in sides), text=text * len(sides),
                    samples=len(sides))
    measured = _measured(model, sides, text)
    planned = saved_bytes(model.transformer_config, tokens, checkpointing, 4)
    assert planned == pytest.approx(measured, rel=0.05), (planned, measured)


def test_plan_partitions_by_zero_stage_and_counts_the_online_encoder() -> None:
    from lens_model.text_encoder import LanguageEncoder

    recipe = load_recipe("tiny", ["pretrain.features=online", "pretrain.zero_stage=2",
                                  "pretrain.precision=bf16", "text_encoder.dtype=bf16"])
    gpu = 80 * 2**30  # the recipe runs on a CPU: give the GPU size
    one, eight = plan(recipe, 1, 1, capacity=gpu), plan(recipe, 1, 8, capacity=gpu)
    assert eight["bytes"]["grads"] == one["bytes"]["grads"] // 8
    assert eight["bytes"]["optimizer"] == one["bytes"]["optimizer"] // 8
    assert one["bytes"]["weights"] == 2 * one["params"]
    assert one["bytes"]["optimizer"] == 12 * one["params"]  # fp32 m, v and master
    encoder = LanguageEncoder.from_spec("minilm", [3, 6], 128, 64)
    lm = sum(p.numel() for p in encoder._frozen[0].parameters())
    assert one["bytes"]["text_encoder"] == 2 * lm
    assert one["bytes"]["ema"] == 4 * one["params"]
    cached = plan(load_recipe("tiny", ["pretrain.features=cached", "pretrain.ema_device=cpu"]),
                  1, 1, capacity=gpu)
    assert cached["bytes"]["text_encoder"] == 0 and cached["bytes"]["ema"] == 0
    fp32 = plan(load_recipe("tiny", ["pretrain.features=online"]), 1, 1, capacity=gpu)
    assert fp32["bytes"]["text_encoder"] == 4 * lm


def test_the_paper_recipe_fits_an_80_gb_rank_with_a_margin() -> None:
    recipe = load_recipe("lens-3.8b")
    out = plan(recipe, recipe.launch.nnodes, recipe.launch.nproc_per_node,
               encoder=21_000_000_000)  # GPT-OSS-20B's model card: 21B parameters
    assert abs(out["params"] - 4.054e9) < 1e7
    assert out["margin"] >= 5 * 2**30, out


def test_plan_cli_prints_the_budget_and_names_bad_input(capsys) -> None:
    from lens import cli

    assert cli.main(["model", "info", "lens-3.8b", "--plan", "16x8",
                     "--encoder-params", "21000000000"]) == 0
    assert "fits, margin" in capsys.readouterr().out
    assert cli.main(["model", "info", "lens-3.8b", "--plan", "16x8"]) == 2
    assert "--encoder-params" in capsys.readouterr().err
    assert cli.main(["model", "info", "lens-3.8b", "--plan", "16by8"]) == 2
    assert "NODESxGPUS" in capsys.readouterr().err
