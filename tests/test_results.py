"""The records stages hand each other (tasks/results.py): what they derive from a stage's raw
output, and the turbo registration's card."""

from __future__ import annotations

import json

import pytest

from lens_model.recipe import load_recipe
from tasks.registry import model_card, turbo_entry
from tasks.results import Evaluation, Registered, TrainedJob, TurboScores

SCORES = {"single": 0.5, "overall": 0.4}


def evaluation(turbo: TurboScores | None) -> Evaluation:
    return Evaluation("run", SCORES, {"single": 0.1, "overall": 0.05}, SCORES,
                      {"single": 0.3, "overall": 0.2}, 0.02, "e1", "grid.png", turbo)


def test_rl_summary_reads_the_trainers_final_event_as_json_gives_it() -> None:
    final = json.loads(json.dumps({"model_dir": "/m", "gold": [[0, 0.2], [10, 0.35]],
                                   "reward_start": 0.4, "reward_end": 0.6,
                                   "reward_hacking": False}))
    job = TrainedJob("r", "rl-tiny", "/runs/rl-tiny", 1.5, final)
    assert job.model_dir == "/m" and job.gold == [(0, 0.2), (10, 0.35)]
    assert job.rl_summary() == {"job": "rl-tiny", "gold_before": 0.2, "gold_after": 0.35,
                                "reward_start": 0.4, "reward_end": 0.6, "reward_hacking": False}
    pretrain = TrainedJob("p", "pretrain-tiny", "/runs/p", 1.0, {"model_dir": "/p"})
    assert pretrain.rl_summary()["gold_before"] is None


def test_the_turbo_card_compares_the_student_with_its_teacher() -> None:
    recipe = load_recipe("tiny")
    teacher = Registered("lens-tiny", "3", "run", "models:/lens-tiny/3", SCORES, {})
    with pytest.raises(ValueError, match="turbo_dir"):
        turbo_entry(recipe, evaluation(None), teacher)
    turbo = TurboScores("/t", {"single": 0.45, "overall": 0.36}, 0.004, "e2", 4,
                        {"single": 0.2, "overall": 0.1}, 6.0)
    turbo_recipe, card, tags = turbo_entry(recipe, evaluation(turbo), teacher)
    assert turbo_recipe.tracking.model_name == "lens-tiny-turbo"
    assert (turbo_recipe.eval.steps, turbo_recipe.eval.cfg) == (4, 1.0)
    assert card.teacher == "lens-tiny/3" and card.eval_hash == "e2"
    assert list(card.columns.values()) == [SCORES, turbo.undistilled_scores]
    assert tags["lens.teacher_overall"] == "0.4000" and tags["lens.speedup"] == "6.00"
    text = model_card(turbo_recipe, tags, card)
    assert "distilled from `lens-tiny/3`" in text and "| overall | 0.360 | 0.400 | 0.100 |" in text
    plain = model_card(recipe, {}, evaluation(None).card())
    assert "DiffusionNFT" in plain and "| overall | 0.400 | 0.050 | 0.200 |" in plain
