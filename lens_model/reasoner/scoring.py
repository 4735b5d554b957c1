"""Scoring a system prompt with the image model: rewrite, draw, judge.

The search's dev set is drawn from both prompt sets (shapes-GenEval and shapes-GenEval-R) at
their own seed, less every prompt the evaluation's test split holds, so the searched prompt
is reported on prompts it was never tuned on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from PIL import Image

from lens_model.data.captions import Prompt, prompt_set
from lens_model.eval.geneval import EvalProtocol, EvalReport, Generate, evaluate
from lens_model.reasoner.base import Reasoner
from lens_model.reasoner.grammar import from_spec, prompt_set_r, render
from lens_model.reasoner.search import Score


def dev_prompts(per_category: int, seed: int, test: Iterable[str]) -> list[Prompt]:
    """``per_category`` prompts of each category of both sets, less the ``test`` texts (a
    category may end up with fewer, or none, when the world has few ways to say it)."""
    held = set(test)
    return [p for p in prompt_set(per_category, seed) + prompt_set_r(per_category, seed)
            if p.text not in held]


def literal(prompts: Iterable[Prompt]) -> list[Prompt]:
    """Each prompt worded as the plain English request for its spec: what a rewrite that
    gets everything right gives, so drawing these bounds what any system prompt can gain
    with this image model."""
    return [replace(p, text=render(from_spec(p.spec))) for p in prompts]


class Rewriting:
    """A generator that has ``reasoner`` rewrite each batch under ``system`` before drawing;
    it keeps the rewrites and counts those the text encoder would cut short."""

    def __init__(self, generate: Generate, reasoner: Reasoner, system: str,
                 truncates: Callable[[str], bool]) -> None:
        self.generate, self.reasoner, self.system = generate, reasoner, system
        self.truncates = truncates
        self.rewrites: list[str] = []
        self.truncated = 0

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        rewrites = self.reasoner.rewrite(self.system, prompts)
        self.rewrites += rewrites
        self.truncated += sum(map(self.truncates, rewrites))
        return self.generate(rewrites, seeds)


def judged(generate: Generate, protocol: EvalProtocol, prompts: list[Prompt] | None,
           reasoner: Reasoner | None, system: str,
           truncates: Callable[[str], bool]) -> tuple[EvalReport, dict[str, float]]:
    """The report of ``prompts`` (the protocol's own when None) drawn from their rewrites
    under ``system`` (or as written, with no ``reasoner``); each result also holds its
    ``rewrite``. Beside it: the share of rewrites the text encoder truncates."""
    if reasoner is None:
        report = evaluate(generate, protocol, prompts=prompts)
        for r in report.results:
            r["rewrite"] = r["prompt"]
        return report, {"truncation_rate": 0.0}
    rewriting = Rewriting(generate, reasoner, system, truncates)
    report = evaluate(rewriting, protocol, prompts=prompts)
    for r, text in zip(report.results, rewriting.rewrites, strict=True):
        r["rewrite"] = text
    return report, {"truncation_rate": rewriting.truncated / len(report.results)}


def as_score(report: EvalReport) -> Score:
    """A report as the search ranks it: per-category scores and overall, and each failed
    prompt as "prompt -> rewrite: the verifier's reason", grouped by category."""
    failures: dict[str, list[str]] = {}
    for r in report.results:
        if not r["passed"]:
            failures.setdefault(r["category"], []).append(
                f"{r['prompt']!r} -> {r['rewrite']!r}: {r['reason'].removeprefix('fail: ')}")
    return Score(dict(report.scores), failures)
