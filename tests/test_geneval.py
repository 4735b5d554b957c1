"""Shapes-GenEval: the protocol's hash, scoring through a generator, the report grid."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from lens_model.data.world import BACKGROUNDS, render
from lens_model.eval.geneval import (
    EvalProtocol,
    evaluate,
    reconstruction_ceiling,
    report_grid,
)
from lens_model.recipe import load_recipe

PROTOCOL = EvalProtocol(prompts_per_category=4, width=32, height=32)


def truth(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
    """A perfect model: each prompt's ground-truth scene, rendered."""
    scenes = {p.text: p.scene for p in PROTOCOL.prompts()}
    return [render(scenes[p], PROTOCOL.width, PROTOCOL.height) for p in prompts]


def noise(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
    """An untrained model: seeded noise, one image per (prompt, seed)."""
    return [Image.fromarray(np.random.default_rng(s).integers(0, 256, (32, 32, 3), np.uint8))
            for s in seeds]


def test_protocol_hash_is_stable_and_covers_every_setting() -> None:
    assert PROTOCOL.hash() == EvalProtocol(prompts_per_category=4, width=32, height=32).hash()
    changed = [EvalProtocol(prompts_per_category=5, width=32, height=32),
               EvalProtocol(prompts_per_category=4, width=32, height=32, cfg=5.0),
               EvalProtocol(prompts_per_category=4, width=32, height=32, seed=1),
               EvalProtocol(prompts_per_category=4, width=32, height=32, sampler="heun"),
               EvalProtocol(prompts_per_category=4, width=48, height=32)]
    assert len({PROTOCOL.hash(), *(p.hash() for p in changed)}) == 1 + len(changed)
    tiny = EvalProtocol.from_recipe(load_recipe("tiny").eval)
    assert (tiny.width, tiny.height) == (32, 32) and len(tiny.prompts()) == 6 * 50


def test_protocol_comes_back_from_its_logged_params() -> None:
    proto = EvalProtocol(prompts_per_category=3, width=48, height=32, cfg=5.5, sampler="heun")
    params = {f"eval.{k}": str(v) for k, v in asdict(proto).items()}
    assert EvalProtocol.from_params(params) == proto  # MLflow keeps params as strings
    del params["eval.cfg"]
    with pytest.raises(ValueError, match="logged no eval.cfg"):
        EvalProtocol.from_params(params)


def test_perfect_model_scores_one_and_noise_zero_with_seeds_per_image() -> None:
    seen: list[int] = []

    def spy(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        seen.extend(seeds)
        return truth(prompts, seeds)

    good = evaluate(spy, PROTOCOL, batch_size=5)
    assert good.scores["overall"] == 1.0 and set(good.scores) >= {"colors", "position"}
    assert seen == list(range(24))  # image i has seed protocol.seed + i, whatever the batch
    bad = evaluate(noise, PROTOCOL)
    assert bad.scores["overall"] == 0.0 and all(not r["passed"] for r in bad.results)
    assert good.to_json()["protocol_hash"] == PROTOCOL.hash()
    grid = report_grid(good)
    assert grid.width > 10 * 32 and grid.height > 3 * 32


def test_a_generator_returning_the_wrong_count_is_refused() -> None:
    with pytest.raises(ValueError, match="returned 1 images for 24 prompts"):
        evaluate(lambda p, s: truth(p, s)[:1], PROTOCOL, batch_size=64)


def test_reconstruction_ceiling_is_one_for_a_lossless_round_trip_and_zero_for_a_lossy_one() -> None:
    assert reconstruction_ceiling(lambda x: x, PROTOCOL)["overall"] == 1.0
    washed = reconstruction_ceiling(lambda x: x * 0.2, PROTOCOL)  # colours pulled to grey
    assert washed["overall"] < 0.2


def test_reconstruction_ceiling_draws_the_scenes_in_the_recipes_world() -> None:
    seen: list[Tensor] = []

    def keep(x: Tensor) -> Tensor:
        seen.append(x)
        return x

    assert reconstruction_ceiling(keep, PROTOCOL, ["mint"], ["plain"])["overall"] == 1.0
    mint = torch.tensor(BACKGROUNDS["mint"][0]) / 127.5 - 1  # every corner is background
    assert all(torch.allclose(x[0, :, 0, 0], mint) for x in seen)
