"""The system-prompt search: edit search against a synthetic scorer, the LLM optimiser
against a real local HTTP server, and the loop's stopping rules."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from lens_model.reasoner.rules import HEADER, RULES, RuleRef, parse, system_prompt
from lens_model.reasoner.search import (
    Candidate,
    EditSearch,
    LLMSearch,
    Score,
    SearchResult,
    prompt_hash,
    search,
    summarise,
)
from lens_model.recipe import EndpointSection
from lens_model.rl.llm import LLMError
from tests.fake_openai import FakeOpenAI

GOOD = {"arithmetic", "english", "canonical", "counted", "relation", "photo"}
BAD = {"long", "no_color", "first_only"}
CATEGORIES = sorted({c for r in RULES.values() for c in r.targets})
SEED = system_prompt([RuleRef("no_color")])


def synthetic(prompt: str) -> Score:
    """Each category starts at 0.5; a good rule for it adds 0.4, a bad one takes 0.15. Each
    category has exactly one good rule, so the best set is GOOD and the score is additive:
    the order and phrasing of rules do not matter."""
    names = {r.name for r in parse(prompt)[0]}
    scores, failures = {}, {}
    for category in CATEGORIES:
        helping = [r for r in RULES.values() if category in r.targets and r.name in names]
        s = 0.5 + sum(0.4 if r.name in GOOD else -0.15 for r in helping)
        scores[category] = s
        reasons = [] if any(r.name in GOOD for r in helping) else ["expected 3 circle, found 2"]
        reasons += [f"{r.name} dropped a shape" for r in helping if r.name in BAD]
        failures[category] = reasons
    scores["overall"] = sum(scores.values()) / len(CATEGORIES)
    return Score(scores, failures)


def run(rng_seed: int = 0, **kw: object) -> SearchResult:
    args = {"candidates_per_round": 8, "patience": 8, "max_rounds": 200, **kw}
    return search(SEED, synthetic, EditSearch(), rng_seed=rng_seed, **args)  # type: ignore[arg-type]


def names(prompt: str) -> set[str]:
    return {r.name for r in parse(prompt)[0]}


def seed_candidate(prompt: str = SEED, score: Score | None = None) -> Candidate:
    return Candidate(prompt, score or synthetic(prompt), None, 0, "", "seed")


# ---------------------------------------------------------------- the search with edits


@pytest.mark.parametrize("rng_seed", [0, 1, 2])
def test_edit_search_finds_the_best_rule_set(rng_seed: int) -> None:
    seen: list[Candidate] = []
    result = run(rng_seed, on_candidate=seen.append)
    assert names(result.best.prompt) == GOOD
    assert result.best.overall == pytest.approx(0.9)
    assert result.stopped == "patience" and result.rounds < 200
    assert all(b >= a for a, b in zip(result.curve, result.curve[1:], strict=False))
    assert len(result.curve) == result.rounds + 1
    assert result.curve[0] == synthetic(SEED).scores["overall"]
    assert result.curve[-1] == result.best.overall
    assert seen == result.candidates  # every scored candidate is reported, seed included
    assert len({c.hash for c in result.candidates}) == len(result.candidates)


def capped(prompt: str) -> Score:
    """:func:`synthetic`, but the image model fails position and indirect prompts whatever
    the wording: the worst categories are ones no rule can fix."""
    score = synthetic(prompt)
    scores = score.scores | {"position": 0.0, "indirect": 0.0}
    scores["overall"] = sum(v for c, v in scores.items() if c != "overall") / len(CATEGORIES)
    return Score(scores, score.failures | {"position": ["expected left of, found above"]})


@pytest.mark.parametrize("rng_seed", [0, 1, 2])
def test_categories_no_rule_can_fix_do_not_trap_the_steering(rng_seed: int) -> None:
    # The recipe's default budget: 4 candidates a round, stopping after 2 flat rounds.
    result = search(SEED, capped, EditSearch(), candidates_per_round=4, patience=2,
                    max_rounds=30, rng_seed=rng_seed)
    assert names(result.best.prompt) - {"relation"} == GOOD - {"relation"}


def test_candidates_descend_from_scored_candidates() -> None:
    result = run()
    seed, rest = result.candidates[0], result.candidates[1:]
    assert (seed.round, seed.parent, seed.edit, seed.summary) == (0, None, "seed", "")
    assert seed.prompt == SEED
    earlier = {seed.hash: seed}
    for cand in rest:
        parent = earlier[cand.parent]  # KeyError: a parent that was never scored
        assert parent.round < cand.round
        assert cand.summary == summarise(parent.score)
        assert cand.edit.split()[0] in EditSearch.OPS
        earlier[cand.hash] = cand
    assert [c.round for c in rest] == sorted(c.round for c in rest)


def test_same_rng_seed_same_search() -> None:
    a, b = run(5), run(5)
    assert [c.prompt for c in a.candidates] == [c.prompt for c in b.candidates]
    assert a.curve == b.curve and a.best.prompt == b.best.prompt
    assert [c.prompt for c in run(6).candidates] != [c.prompt for c in a.candidates]


def test_ties_keep_the_earlier_candidate() -> None:
    # Rewordings and reorders score the same as the seed: the seed must stay the best.
    result = search(SEED, lambda p: Score({"overall": 0.5}, {}), EditSearch(),
                    candidates_per_round=4, patience=3, max_rounds=50, rng_seed=0)
    assert result.best.prompt == SEED and len(result.candidates) == 1 + 3 * 4


def test_patience_stops_a_search_that_never_improves() -> None:
    calls: list[str] = []

    def flat(prompt: str) -> Score:
        calls.append(prompt)
        return Score({"overall": 0.3, "language": 0.3}, {"language": ["wrong language"]})

    result = search(SEED, flat, EditSearch(), candidates_per_round=3, patience=4,
                    max_rounds=100, rng_seed=0)
    assert (result.stopped, result.rounds) == ("patience", 4)
    assert result.curve == [0.3] * 5 and len(calls) == 1 + 4 * 3
    assert result.best.edit == "seed"


def test_max_rounds_stops_a_search_that_keeps_improving() -> None:
    counter = iter(range(10 ** 6))
    result = search(SEED, lambda p: Score({"overall": float(next(counter))}, {}), EditSearch(),
                    candidates_per_round=2, patience=1, max_rounds=5, rng_seed=0)
    assert (result.stopped, result.rounds) == ("max_rounds", 5)
    assert result.curve == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]


class Repeating:
    """An optimiser that proposes the seed, one new prompt twice, then nothing new."""

    def propose(self, best: Candidate, n: int, rng: random.Random) -> list[tuple[str, str]]:
        return [(SEED, "again"), (HEADER + "\nBe brief.", "x"), (HEADER + "\nBe brief.", "x")]


def test_a_prompt_is_scored_once_however_often_proposed() -> None:
    calls: list[str] = []

    def scorer(prompt: str) -> Score:
        calls.append(prompt)
        return Score({"overall": 0.1}, {})

    result = search(SEED, scorer, Repeating(), candidates_per_round=3, patience=2,
                    max_rounds=10, rng_seed=0)
    assert calls == [SEED, HEADER + "\nBe brief."]
    assert len(result.candidates) == 2 and result.stopped == "patience"


# ---------------------------------------------------------------- the edits themselves


def test_add_is_steered_to_the_worst_category() -> None:
    scores = {c: 0.9 for c in CATEGORIES} | {"language": 0.2, "overall": 0.8}
    best = seed_candidate(system_prompt([RuleRef("photo")]), Score(scores, {}))
    added = Counter()
    for rng_seed in range(400):  # fresh optimisers: one first proposal each
        [(_, edit)] = EditSearch().propose(best, 1, random.Random(rng_seed))
        if edit.startswith("add "):
            added[edit.split()[1]] += 1
    total = sum(added.values())
    assert total > 250
    # 0.75 steered adds, all english, and a quarter of uniform edits (add, drop or reword),
    # whose adds pick english one time in 8: 0.76 of 0.83
    assert 0.85 < added["english"] / total < 0.97
    assert "english" in RULES and "language" in RULES["english"].targets
    assert len(added) > 3  # the unsteered adds still explore the rest


def test_unsteered_adds_are_uniform() -> None:
    best = seed_candidate(system_prompt([RuleRef("photo")]),
                          Score({"language": 0.0, "overall": 0.0}, {}))
    added = Counter()
    for rng_seed in range(400):
        for _, edit in EditSearch(steer=0.0).propose(best, 1, random.Random(rng_seed)):
            if edit.startswith("add "):
                added[edit.split()[1]] += 1
    assert set(added) == set(RULES) - {"photo"} and added["english"] < 0.3 * sum(added.values())


def test_edits_are_new_keep_free_lines_and_respect_the_cap() -> None:
    prompt = "\n".join([HEADER, RULES["photo"].phrasings[0], "Never add text to the picture.",
                        RULES["english"].phrasings[1], RULES["long"].phrasings[2]])
    best = seed_candidate(prompt)
    opt = EditSearch(max_rules=3)
    rng = random.Random(0)
    proposals = opt.propose(best, 30, rng)
    hashes = [prompt_hash(text) for text, _ in proposals]
    # 3 drops, 3 swaps and 3 x 2 rewordings: the whole neighbourhood, each once
    assert len(set(hashes)) == len(hashes) == 12 and best.hash not in hashes
    assert opt.propose(best, 30, rng) == []
    edits = Counter(edit.split()[0] for _, edit in proposals)
    assert "add" not in edits and set(edits) == {"drop", "swap", "reword"}
    for text, _ in proposals:
        lines = text.splitlines()
        assert lines[0] == HEADER and "Never add text to the picture." in lines
        assert len(parse(text)[0]) <= 3 and parse(text)[1] == ["Never add text to the picture."]


def test_edits_reach_the_empty_rule_set_and_run_out() -> None:
    one = seed_candidate(system_prompt([RuleRef("canonical")]))
    opt = EditSearch(max_rules=1)  # so only drop and reword apply: 1 + 2 prompts in all
    proposals = opt.propose(one, 10, random.Random(0))
    assert sorted(e for _, e in proposals) == ["drop canonical", "reword canonical",
                                               "reword canonical"]
    assert (HEADER, "drop canonical") in proposals
    assert opt.propose(one, 5, random.Random(1)) == []


def test_edit_search_is_deterministic_given_the_rng() -> None:
    best = seed_candidate(system_prompt([RuleRef("photo"), RuleRef("long", 1)]))
    a = EditSearch().propose(best, 12, random.Random(3))
    assert a == EditSearch().propose(best, 12, random.Random(3))


# ---------------------------------------------------------------- the failure summary


def test_summary_lists_categories_worst_first_with_common_reasons() -> None:
    score = Score({"overall": 0.5, "position": 0.7, "language": 0.1, "counting": 0.4},
                  {"language": ["answered in French"] * 3 + ["wrong shape"] * 2 + ["x", "y"],
                   "counting": ["expected 3 circle, found 2"], "colors": ["red became blue"]})
    text = summarise(score, per_category=2)
    lines = text.splitlines()
    assert lines[0] == "overall 0.500"
    assert lines[1] == "language 0.100: 3x answered in French; 2x wrong shape"
    assert lines[2] == "counting 0.400: 1x expected 3 circle, found 2"
    assert lines[3] == "position 0.700: no failures recorded"
    assert lines[4] == "colors ?: 1x red became blue"
    assert "answered" not in summarise(score, per_category=0)


# ---------------------------------------------------------------- the LLM optimiser


def endpoint(api: FakeOpenAI, **kw: object) -> EndpointSection:
    return EndpointSection(base_url=api.base_url, model="fake-model",
                           **{"timeout_s": 30.0, "max_retries": 2, **kw})


def test_llm_search_sends_the_best_prompt_and_failures() -> None:
    best = seed_candidate()
    answer = json.dumps({"prompts": [f"{HEADER}\nTranslate.", "  Be literal.  ", "third"]})
    with FakeOpenAI(lambda req: f"Here you go:\n```json\n{answer}\n```") as api:
        proposals = LLMSearch(endpoint(api)).propose(best, 2, random.Random(0))
    assert proposals == [(f"{HEADER}\nTranslate.", "llm"), ("Be literal.", "llm")]
    [request] = api.requests
    asked = request["messages"][-1]["content"]
    assert best.prompt in asked and summarise(best.score) in asked
    assert "expected 3 circle, found 2" in asked and "2 different" in asked
    assert request["model"] == "fake-model" and "seed" in request


def test_llm_search_retries_a_malformed_answer() -> None:
    replies = iter(["not json", '{"prompts": "one"}', '{"prompts": ["ok", "  "]}',
                    '{"prompts": [3]}', '{"prompts": ["fine"]}'])
    with FakeOpenAI(lambda req: next(replies)) as api:
        proposals = LLMSearch(endpoint(api, max_retries=4)).propose(
            seed_candidate(), 3, random.Random(0))
    assert proposals == [("fine", "llm")] and len(api.requests) == 5


def test_llm_search_gives_up_with_llm_error() -> None:
    with FakeOpenAI(lambda req: '{"ideas": []}') as api:
        with pytest.raises(LLMError, match="after 2 tries.*'prompts' must be"):
            LLMSearch(endpoint(api, max_retries=1)).propose(seed_candidate(), 2,
                                                            random.Random(0))
    assert len(api.requests) == 2


def test_llm_search_drops_over_long_prompts_and_retries_when_none_fit() -> None:
    """An over-long proposal would be refused by the reasoner and end the search: it is
    dropped, and an answer with nothing short enough is asked again, a bounded number of
    times."""
    long = "x" * 41
    replies = iter([json.dumps({"prompts": [long, long]}),
                    json.dumps({"prompts": [long, "short enough"]})])
    with FakeOpenAI(lambda req: next(replies)) as api:
        proposals = LLMSearch(endpoint(api), max_chars=40).propose(
            seed_candidate(), 2, random.Random(0))
    assert proposals == [("short enough", "llm")] and len(api.requests) == 2
    assert "at most 40 characters" in api.requests[0]["messages"][-1]["content"]
    with FakeOpenAI(lambda req: json.dumps({"prompts": [long]})) as api:
        with pytest.raises(LLMError, match="over 40 characters.*max_system_chars"):
            LLMSearch(endpoint(api, max_retries=1), max_chars=40).propose(
                seed_candidate(), 1, random.Random(0))


def test_search_with_the_llm_optimiser() -> None:
    better = system_prompt([RuleRef(n) for n in sorted(GOOD)])
    with FakeOpenAI(lambda req: json.dumps({"prompts": [better, SEED]})) as api:
        result = search(SEED, synthetic, LLMSearch(endpoint(api)), candidates_per_round=2,
                        patience=1, max_rounds=5, rng_seed=0)
    assert result.best.prompt == better and result.best.edit == "llm"
    assert (result.rounds, result.stopped, len(result.candidates)) == (2, "patience", 2)
    assert len(api.requests) == 2


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(("kw", "match"), [
    ({"candidates_per_round": 0}, "candidates_per_round=0"),
    ({"patience": 0}, "patience=0"),
    ({"max_rounds": -1, "patience": 0}, "patience=0, max_rounds=-1: each must be 1 or more"),
])
def test_search_refuses_bad_counts(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        run(**kw)


def test_search_refuses_an_empty_seed_and_a_scorer_without_overall() -> None:
    with pytest.raises(ValueError, match="seed system prompt is empty"):
        search("  \n", synthetic, EditSearch(), candidates_per_round=1, patience=1,
               max_rounds=1, rng_seed=0)
    for overall in ({}, {"overall": float("nan")}, {"overall": "high"}):
        with pytest.raises(ValueError, match="finite scores\\['overall'\\]"):
            search(SEED, lambda p, o=overall: Score(o, {}), EditSearch(),
                   candidates_per_round=1, patience=1, max_rounds=1, rng_seed=0)


def test_optimisers_and_summary_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError, match="steer is a probability"):
        EditSearch(steer=1.5)
    with pytest.raises(ValueError, match="max_rules must be 0 or more"):
        EditSearch(max_rules=-1)
    with pytest.raises(ValueError, match="n must be 1 or more"):
        EditSearch().propose(seed_candidate(), 0, random.Random(0))
    with pytest.raises(ValueError, match="n must be 1 or more"):
        LLMSearch(EndpointSection()).propose(seed_candidate(), 0, random.Random(0))
    with pytest.raises(ValueError, match="per_category must be 0 or more"):
        summarise(synthetic(SEED), per_category=-1)


def test_compare_diffs_two_system_prompts_rule_by_rule() -> None:
    from tasks.compare import prompt_diff

    a = system_prompt([RuleRef("canonical"), RuleRef("english")])
    b = system_prompt([RuleRef("canonical"), RuleRef("relation")])
    out = prompt_diff(a, b)
    assert out["hashes"] == [prompt_hash(a), prompt_hash(b)]
    assert [line for line in out["diff"] if line[:1] in "+-" and line[:3] not in ("+++", "---")] \
        == ["-" + RULES["english"].phrasings[0], "+" + RULES["relation"].phrasings[0]]
    assert prompt_diff(a, a)["diff"] == []
    assert prompt_diff(None, b)["hashes"] == [None, prompt_hash(b)]
