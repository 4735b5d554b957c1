"""Training the reasoner LM: its examples, its held-out split, its schedule and its score."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from lens_model.reasoner import grammar
from lens_model.reasoner.base import new_stats
from lens_model.reasoner.lm import HFReasoner
from lens_model.reasoner.rules import HEADER, RULES, parse
from lens_model.reasoner.training import (
    changes,
    heldout_request,
    heldout_rules,
    heldout_set,
    rule_following,
    sample_chat,
    train_reasoner,
)
from lens_model.recipe import ReasonerSection

# The settings the mechanism test trains with (what it takes: docs/reasoner.md).
MECHANISM = {"steps": 5000, "train_batch": 8, "lr": 2e-3, "warmup_steps": 30}


def test_training_chats_never_touch_the_heldout_side() -> None:
    rng = random.Random(0)
    chats = [sample_chat(rng, 4) for _ in range(400)]
    assert not any(heldout_rules(c.names) for c in chats)
    assert not any(heldout_request(q) for c in chats for q in c.requests)
    held = [sample_chat(rng, 2, heldout=True) for _ in range(100)]
    assert all(heldout_rules(c.names) for c in held)
    assert all(heldout_request(q) for c in held for q in c.requests)


def test_the_split_ignores_order_phrasing_and_wording() -> None:
    """A rule set is held out whatever its order; a request whatever its wording, so that a
    French or crimson wording of a held-out request is never trained on either."""
    names = list(RULES)[:4]
    assert heldout_rules(names) == heldout_rules(names[::-1])
    rng = random.Random(1)
    for _ in range(200):
        req = grammar.sample_request(rng)
        for kind in grammar.kinds_for(req):
            assert heldout_request(grammar.harden(req, kind, rng)) == heldout_request(req)


def test_both_sides_of_the_split_are_used() -> None:
    """About one in eight rule sets and one in eight requests are held out: neither side is
    empty or everything."""
    rng = random.Random(2)
    reqs = [grammar.sample_request(rng) for _ in range(2000)]
    share = sum(map(heldout_request, reqs)) / len(reqs)
    assert 0.06 < share < 0.2
    sets = [[n for n in RULES if rng.random() < 0.5] for _ in range(2000)]
    share = sum(map(heldout_rules, sets)) / len(sets)
    assert 0.06 < share < 0.2


def test_answers_apply_exactly_the_prompts_rules() -> None:
    rng = random.Random(4)
    chat = sample_chat(rng, 3)
    for (user, answer), req in zip(chat.turns(), chat.requests, strict=True):
        assert user == grammar.render(req)
        assert answer == grammar.rewrite(chat.names, req)


def test_the_answer_follows_from_the_words_of_the_request() -> None:
    """Requests worded alike get one answer under every rule set: an answer the words do not
    determine cannot be learnt. (A foreign request's polite lead, which its wording drops,
    once leaked into its translation.)"""
    rng = random.Random(7)
    rule_sets = [[name] for name in RULES] + [list(RULES)]
    checked = 0
    for _ in range(400):
        req = sample_chat(rng, 1).requests[0]
        for lead in range(-1, len(grammar.LEADS)):
            twin = dataclasses.replace(req, lead=lead)
            if twin != req and grammar.render(twin) == grammar.render(req):
                checked += 1
                for names in rule_sets:
                    assert grammar.rewrite(names, twin) == grammar.rewrite(names, req), names
    assert checked > 100  # foreign requests, whose wording has no polite lead


def test_heldout_set_has_each_rule_at_work() -> None:
    examples = heldout_set(4, seed=0)
    assert sorted({r for _, r in examples}) == sorted(RULES)
    for chat, rule in examples:
        assert rule in chat.names and len(chat.requests) == 1
        assert changes(rule, chat.names, chat.requests[0])
        assert heldout_rules(chat.names) and heldout_request(chat.requests[0])
    assert [c.system for c, _ in examples] == [c.system for c, _ in heldout_set(4, seed=0)]


class Oracle:
    """Answers with the grammar's rewrite, but only for the rules it is told to know: a
    reasoner that reads its system prompt, for scoring without a trained model."""

    def __init__(self, known: set[str], requests: list[grammar.Request]) -> None:
        self.known = known
        self.by_text = {grammar.render(q): q for q in requests}
        self.stats = new_stats()

    def rewrite(self, system_prompt: str, prompts: list[str]) -> list[str]:
        names = [r.name for r in parse(system_prompt)[0] if r.name in self.known]
        return [grammar.rewrite(names, self.by_text[p]) for p in prompts]


def test_rule_following_scores_each_rule_by_exact_match() -> None:
    examples = heldout_set(6, seed=1)
    requests = [c.requests[0] for c, _ in examples]
    scores = rule_following(Oracle(set(RULES) - {"english"}, requests), examples)
    assert scores["rule/english"] == 0.0
    assert 0.0 < scores["exact"] < 1.0
    perfect = rule_following(Oracle(set(RULES), requests), examples)
    assert perfect == {**{f"rule/{r}": 1.0 for r in RULES}, "exact": 1.0}


def test_train_reasoner_saves_a_loadable_model_and_logs_its_curve(tmp_path: Path) -> None:
    section = ReasonerSection(steps=5, train_batch=2, turns=2, hidden_size=32, layers=2,
                              heads=2, vocab_size=400, warmup_steps=2, log_every=2)
    logged: list[tuple[int, float, float]] = []
    out = train_reasoner(section, 0, tmp_path / "r", lambda *row: logged.append(row))
    assert [step for step, _, _ in logged] == [0, 2, 4]
    assert all(loss > 0 for _, loss, _ in logged) and logged[0][2] < logged[1][2]
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors",
                                              "tokenizer.json"}
    reasoner = HFReasoner(out, max_new_tokens=4)
    assert len(reasoner.rewrite(HEADER + "\nDo not mention colours.", ["a red circle"])) == 1
    assert not list(tmp_path.glob(".r*"))  # the atomic write left no temporary folder


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the suite's 600 s is for the default run
def test_trained_reasoner_follows_each_rule_on_heldout_prompts(tmp_path: Path) -> None:
    """The mechanism target: trained only on the training side of both splits, the small
    reasoner applies each rule exactly on held-out rule sets and request contents, at least
    0.9 of the time per rule. Slow: 17 to 27 minutes on 2 CPU cores, too long for the default
    run."""
    torch.set_num_threads(2)
    section = ReasonerSection(**MECHANISM)
    train_reasoner(section, 0, tmp_path / "r")
    scores = rule_following(HFReasoner(tmp_path / "r", max_new_tokens=64), heldout_set(30, 0))
    assert all(scores[f"rule/{r}"] >= 0.9 for r in RULES), scores
