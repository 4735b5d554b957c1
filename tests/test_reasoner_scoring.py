"""Scoring a system prompt with the image model: the dev set, the rewrites, the report."""

from __future__ import annotations

from PIL import Image

from lens_model.data.captions import prompt_set
from lens_model.eval.geneval import R_PROMPT_SET_VERSION, EvalProtocol
from lens_model.reasoner.base import new_stats
from lens_model.reasoner.grammar import KINDS, prompt_set_r
from lens_model.reasoner.scoring import as_score, dev_prompts, judged, literal
from lens_model.recipe import EvalSection


def test_dev_prompts_hold_no_test_prompt() -> None:
    test = [p.text for p in prompt_set(20, 0) + prompt_set_r(20, 0)]
    dev = dev_prompts(20, 1, test)
    assert dev and not {p.text for p in dev} & set(test)
    assert {p.category for p in dev} >= set(KINDS)  # hard wordings rarely collide
    every = dev_prompts(20, 1, [])
    assert len(every) > len(dev)  # the world is small: some plain prompts were in test


def test_literal_words_each_prompt_as_the_plain_request_for_its_spec() -> None:
    plain = prompt_set(10, 0)
    assert [p.text for p in literal(plain)] == [p.text for p in plain]  # already literal
    hard = prompt_set_r(10, 0)
    for p, lit in zip(hard, literal(hard), strict=True):
        assert (lit.spec, lit.category, lit.scene) == (p.spec, p.category, p.scene)
        assert lit.text.startswith("a photo of ") and lit.text != p.text
    # the plain set's wording of the same spec, where it holds one
    by_spec = {repr(p.spec): p.text for p in prompt_set(50, 0)}
    matched = [lit for lit in literal(hard) if repr(lit.spec) in by_spec]
    assert matched and all(lit.text == by_spec[repr(lit.spec)] for lit in matched)


class Upper:
    """A reasoner that shouts, and one of whose rewrites the encoder would cut."""

    def __init__(self) -> None:
        self.stats = new_stats()
        self.systems: list[str] = []

    def rewrite(self, system_prompt: str, prompts: list[str]) -> list[str]:
        self.systems.append(system_prompt)
        return [p.upper() for p in prompts]


def blank(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), (200, 200, 200)) for _ in prompts]


def test_judged_draws_the_rewrites_and_counts_truncation() -> None:
    protocol = EvalProtocol.from_recipe(EvalSection(prompts_per_category=2, size="32x32"),
                                        version=R_PROMPT_SET_VERSION)
    drawn: list[str] = []

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        drawn.extend(prompts)
        return blank(prompts, seeds)

    upper = Upper()
    report, stats = judged(generate, protocol, None, upper, "Shout.", lambda t: "1 + 1" in t)
    texts = [p.text for p in protocol.prompts()]
    assert drawn == [t.upper() for t in texts] and upper.systems == ["Shout."]
    assert [r["rewrite"] for r in report.results] == drawn
    assert stats["truncation_rate"] == sum("1 + 1" in t for t in drawn) / len(texts)
    assert set(report.scores) == {*KINDS, "overall"}
    drawn.clear()
    plain, stats = judged(generate, protocol, None, None, "", lambda t: True)
    assert drawn == texts and stats == {"truncation_rate": 0.0}
    assert [r["rewrite"] for r in plain.results] == texts


def test_as_score_groups_failures_by_category_with_the_rewrite() -> None:
    protocol = EvalProtocol.from_recipe(EvalSection(prompts_per_category=1, size="32x32"))
    report, _ = judged(blank, protocol, None, Upper(), "Shout.", lambda t: False)
    score = as_score(report)
    assert score.scores == report.scores and score.scores["overall"] == 0.0
    assert set(score.failures) == {r["category"] for r in report.results}
    first = report.results[0]
    line = score.failures[first["category"]][0]
    assert line.startswith(f"{first['prompt']!r} -> {first['prompt'].upper()!r}: found")
