"""Training-free search over a reasoner's system prompt, as in the Lens paper.

An optimiser is given the best system prompt so far and a text summary of its failures, and
proposes better ones; each is scored on a dev prompt set and the best is kept, until
``patience`` rounds bring no improvement. Two optimisers: :class:`EditSearch` edits over the
rule library (cheap, local, deterministic) and :class:`LLMSearch` asks a chat model.

Pure logic: the caller scores (``Scorer``) and logs (``on_candidate``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from lens_model.reasoner.base import LIMIT_KEY
from lens_model.reasoner.rules import MAX_RULES, RULES, RuleRef, parse
from lens_model.recipe import EndpointSection
from lens_model.rl.llm import chat_json

log = logging.getLogger(__name__)

OVERALL = "overall"


@dataclass(frozen=True)
class Score:
    """A system prompt's dev score: per category plus ``"overall"``, and why prompts failed."""

    scores: dict[str, float]
    failures: dict[str, list[str]]


Scorer = Callable[[str], Score]


def prompt_hash(text: str) -> str:
    """The first 12 hex digits of the sha256 of the stripped text."""
    return hashlib.sha256(text.strip().encode()).hexdigest()[:12]


def summarise(score: Score, per_category: int = 3) -> str:
    """Categories from worst to best, each with its score and most common failure reasons."""
    if per_category < 0:
        raise ValueError(f"per_category must be 0 or more; got {per_category}")
    lines = [f"{OVERALL} {score.scores[OVERALL]:.3f}"] if OVERALL in score.scores else []
    scored = sorted((s, c) for c, s in score.scores.items() if c != OVERALL)
    # Failures of a category with no score still tell the optimiser something: list them last.
    unscored = sorted(set(score.failures) - set(score.scores) - {OVERALL})
    rows = [(c, f"{s:.3f}") for s, c in scored] + [(c, "?") for c in unscored]
    for category, shown in rows:
        common = Counter(score.failures.get(category, [])).most_common(per_category)
        reasons = "; ".join(f"{n}x {reason}" for reason, n in common)
        lines.append(f"{category} {shown}: {reasons or 'no failures recorded'}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Candidate:
    """One scored system prompt, and where it came from."""

    prompt: str
    score: Score
    parent: str | None  # the parent's hash; None for the seed
    round: int
    summary: str = ""  # the failure summary it was proposed from; empty for the seed
    edit: str = ""  # what was done, e.g. "add english", "llm", "seed"

    @property
    def hash(self) -> str:
        return prompt_hash(self.prompt)

    @property
    def overall(self) -> float:
        return self.score.scores[OVERALL]


class Optimiser(Protocol):
    def propose(self, best: Candidate, n: int,
                rng: random.Random) -> list[tuple[str, str]]:
        """Up to ``n`` new system prompts, each with a description of the edit."""
        ...


# ---------------------------------------------------------------- edits over the rule library

Line = RuleRef | str  # a library rule, or any other line kept verbatim


def _lines(text: str) -> list[Line]:
    """The prompt's lines, library rules as RuleRefs (the header and free text as strings)."""
    out: list[Line] = []
    for line in text.strip().splitlines():
        known, _ = parse(line)
        out.append(known[0] if known else line)
    return out


def _render(lines: list[Line]) -> str:
    return "\n".join(x.text if isinstance(x, RuleRef) else x for x in lines)


def _rule_slots(lines: list[Line]) -> list[int]:
    return [i for i, x in enumerate(lines) if isinstance(x, RuleRef)]


class EditSearch:
    """Local edits over the rule library: add, drop, swap two rules, reword one.

    Stateful: it remembers every prompt it has seen (proposed, or handed in as ``best``) and
    never proposes one twice, so use one instance per search. Edits are steered by failures:
    with probability ``steer`` a proposal adds an absent rule, or drops a present one, written
    for the worst-scoring category that such an untried edit concerns; otherwise it is a
    uniformly drawn edit. A steered edit made once from a prompt is not steered to again from
    it, so a category that no rule can fix (the image model fails it whatever the wording)
    does not hold the steering. Deterministic given the rng.
    """

    OPS = ("add", "drop", "swap", "reword")

    def __init__(self, steer: float = 0.75, max_rules: int = MAX_RULES,
                 tries_per_proposal: int = 50) -> None:
        if not 0.0 <= steer <= 1.0:
            raise ValueError(f"steer is a probability in [0, 1]; got {steer}")
        if max_rules < 0 or tries_per_proposal < 1:
            raise ValueError(f"max_rules must be 0 or more and tries_per_proposal 1 or more; "
                             f"got {max_rules} and {tries_per_proposal}")
        self.steer = steer
        self.max_rules = max_rules
        self.tries_per_proposal = tries_per_proposal
        self.seen: set[str] = set()
        self.tried: dict[str, set[str]] = {}  # prompt hash -> its edits so far ("add x")

    def propose(self, best: Candidate, n: int,
                rng: random.Random) -> list[tuple[str, str]]:
        """Up to ``n`` unseen edits of ``best``; fewer when its neighbourhood is used up."""
        if n < 1:
            raise ValueError(f"n must be 1 or more; got {n}")
        self.seen.add(best.hash)
        lines = _lines(best.prompt)
        tried = self.tried.setdefault(best.hash, set())
        present = [x.name for x in lines if isinstance(x, RuleRef)]
        absent = [name for name in RULES if name not in present]
        out: list[tuple[str, str]] = []
        for _ in range(n * self.tries_per_proposal):
            if len(out) == n:
                break
            ops = self._ops(lines)
            if not ops:
                break
            steered = self._steered(best.score, present, ops, tried)
            if steered and rng.random() < self.steer:
                op, name = rng.choice(steered).split()
                edited, edit = getattr(self, "_" + op)(lines, [name], rng)
            else:
                op = rng.choice(ops)
                edited, edit = getattr(self, "_" + op)(lines, absent if op == "add" else
                                                       present, rng)
            text = _render(edited)
            if prompt_hash(text) not in self.seen:
                self.seen.add(prompt_hash(text))
                out.append((text, edit))
                tried.add(edit)
        return out

    def _ops(self, lines: list[Line]) -> list[str]:
        """The edits that apply to a prompt with these lines."""
        present = len(_rule_slots(lines))
        names = {x.name for x in lines if isinstance(x, RuleRef)}
        ok = {"add": present < self.max_rules and len(names) < len(RULES), "drop": present > 0,
              "swap": present > 1, "reword": present > 0}
        return [op for op in self.OPS if ok[op]]

    @staticmethod
    def _steered(score: Score, present: list[str], ops: list[str],
                 tried: set[str]) -> list[str]:
        """Untried edits ("add x", "drop y") of rules written for the worst category that
        any of them concerns."""
        edits = [f"add {n}" for n in RULES if n not in present and "add" in ops] + \
            [f"drop {n}" for n in present if "drop" in ops]
        edits = [e for e in edits if e not in tried]
        categories = sorted((s, c) for c, s in score.scores.items() if c != OVERALL)
        for worst, _ in categories:
            tied = {c for s, c in categories if s == worst}
            pool = [e for e in edits if tied & set(RULES[e.split()[1]].targets)]
            if pool:
                return pool
        return []

    @staticmethod
    def _add(lines: list[Line], pool: list[str],
             rng: random.Random) -> tuple[list[Line], str]:
        name = rng.choice(pool)
        ref = RuleRef(name, rng.randrange(len(RULES[name].phrasings)))
        # Never above the first line, which is the header in any prompt that has one.
        at = rng.randint(1 if lines else 0, len(lines))
        return [*lines[:at], ref, *lines[at:]], f"add {name}"

    @staticmethod
    def _drop(lines: list[Line], pool: list[str],
              rng: random.Random) -> tuple[list[Line], str]:
        name = rng.choice(pool)
        at = next(i for i, x in enumerate(lines) if isinstance(x, RuleRef) and x.name == name)
        return [*lines[:at], *lines[at + 1:]], f"drop {name}"

    @staticmethod
    def _swap(lines: list[Line], pool: list[str],
              rng: random.Random) -> tuple[list[Line], str]:
        i, j = sorted(rng.sample(_rule_slots(lines), 2))
        out = list(lines)
        out[i], out[j] = out[j], out[i]
        a, b = out[j], out[i]  # the names in their original order
        assert isinstance(a, RuleRef) and isinstance(b, RuleRef)
        return out, f"swap {a.name} {b.name}"

    @staticmethod
    def _reword(lines: list[Line], pool: list[str],
                rng: random.Random) -> tuple[list[Line], str]:
        at = rng.choice(_rule_slots(lines))
        ref = lines[at]
        assert isinstance(ref, RuleRef)
        others = [i for i in range(len(RULES[ref.name].phrasings)) if i != ref.phrasing]
        out = list(lines)
        out[at] = RuleRef(ref.name, rng.choice(others)) if others else ref
        return out, f"reword {ref.name}"


# ---------------------------------------------------------------- a chat model as optimiser

OPTIMISER_SYSTEM = (
    "You improve the system prompt of a reasoner: a language model that rewrites a user's "
    "request for a picture into a prompt for a text-to-image model. You are given the best "
    "system prompt so far and a summary of the requests it still fails on, by category, "
    "worst first. Write improved system prompts that fix those failures without breaking "
    "what works. Reply with one JSON object and nothing else.")


def _check_prompts(answer: dict[str, Any], max_chars: int) -> dict[str, list[str]]:
    """The answer's {"prompts": [...]}, stripped, without those over ``max_chars`` (each
    would be refused by the reasoner and end the search); a ValueError says what is wrong."""
    prompts = answer.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        raise ValueError("'prompts' must be a non-empty list of system prompts")
    if not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("every entry of 'prompts' must be a non-empty string")
    stripped = [p.strip() for p in prompts]
    kept = [p for p in stripped if len(p) <= max_chars]
    if not kept:
        raise ValueError(f"every proposed system prompt is over {max_chars} characters "
                         f"({LIMIT_KEY}): write shorter ones")
    if len(kept) < len(stripped):
        log.warning("dropped %d of %d proposed system prompts over %d characters (%s)",
                    len(stripped) - len(kept), len(stripped), max_chars, LIMIT_KEY)
    return {"prompts": kept}


class LLMSearch:
    """Proposals from an OpenAI-compatible chat endpoint, for real deployments."""

    def __init__(self, endpoint: EndpointSection, max_chars: int = 2000,
                 temperature: float = 1.0) -> None:
        self.endpoint, self.max_chars, self.temperature = endpoint, max_chars, temperature

    def messages(self, best: Candidate, n: int) -> list[dict[str, str]]:
        ask = (f"Best system prompt so far (overall score {best.overall:.3f}):\n"
               f"<<<\n{best.prompt.strip()}\n>>>\n\n"
               f"Its failures on the dev prompts:\n{summarise(best.score)}\n\n"
               f"Write {n} different improved system prompts, each complete on its own and "
               f"at most {self.max_chars} characters long.\n"
               'Answer as JSON: {"prompts": ["...", "..."]}')
        return [{"role": "system", "content": OPTIMISER_SYSTEM}, {"role": "user", "content": ask}]

    def propose(self, best: Candidate, n: int,
                rng: random.Random) -> list[tuple[str, str]]:
        """Up to ``n`` prompts from the model (it may write fewer; extra ones are dropped)."""
        if n < 1:
            raise ValueError(f"n must be 1 or more; got {n}")
        variant = rng.randrange(10 ** 6)  # the rng decides the sampling seed: reruns repeat
        answer = chat_json(self.endpoint, self.messages(best, n),
                           f"system prompt proposals from {best.hash}",
                           check=lambda a: _check_prompts(a, self.max_chars),
                           temperature=self.temperature, seed=variant)
        return [(p, "llm") for p in answer["prompts"][:n]]


# ---------------------------------------------------------------- the search loop


@dataclass(frozen=True)
class SearchResult:
    best: Candidate
    candidates: list[Candidate]  # every scored candidate, seed first, in scoring order
    curve: list[float]  # best-so-far overall after each round; [0] is the seed
    rounds: int  # rounds run after the seed
    stopped: str  # "patience" or "max_rounds"


def _checked(score: Score, prompt: str) -> Score:
    """The scorer's answer, refused when it has no finite overall score to rank by."""
    overall = score.scores.get(OVERALL)
    try:
        finite = math.isfinite(float(overall))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        finite = False
    if not finite:
        raise ValueError(f"the scorer must return a finite scores['{OVERALL}']; got "
                         f"{overall!r} for prompt {prompt_hash(prompt)}")
    return score


def _check_args(seed: str, **counts: int) -> None:
    if not seed.strip():
        raise ValueError("the seed system prompt is empty")
    bad = [f"{name}={value}" for name, value in counts.items() if value < 1]
    if bad:
        raise ValueError(f"{', '.join(bad)}: each must be 1 or more")


def search(seed: str, scorer: Scorer, optimiser: Optimiser, *, candidates_per_round: int,
           patience: int, max_rounds: int, rng_seed: int,
           on_candidate: Callable[[Candidate], None] | None = None) -> SearchResult:
    """Hill-climb from ``seed``: each round scores up to ``candidates_per_round`` proposals
    made from the best so far; stop after ``patience`` rounds without improvement or after
    ``max_rounds``. A prompt is scored once even when proposed again."""
    _check_args(seed, candidates_per_round=candidates_per_round, patience=patience,
                max_rounds=max_rounds)
    rng = random.Random(rng_seed)
    emit = on_candidate or (lambda c: None)
    best = Candidate(seed, _checked(scorer(seed), seed), None, 0, "", "seed")
    emit(best)
    candidates, curve, scored = [best], [best.overall], {best.hash}
    stale, rounds, stopped = 0, 0, "max_rounds"
    for rounds in range(1, max_rounds + 1):
        summary = summarise(best.score)
        leader = best
        proposals = optimiser.propose(best, candidates_per_round, rng)
        for text, edit in proposals[:candidates_per_round]:  # an optimiser may overshoot
            if prompt_hash(text) in scored:
                continue
            scored.add(prompt_hash(text))
            cand = Candidate(text, _checked(scorer(text), text), best.hash, rounds, summary,
                             edit)
            emit(cand)
            candidates.append(cand)
            if cand.overall > leader.overall:  # strictly: an equal never replaces the best
                leader = cand
        stale = 0 if leader is not best else stale + 1
        best = leader
        curve.append(best.overall)
        if stale >= patience:
            stopped = "patience"
            break
    return SearchResult(best, candidates, curve, rounds, stopped)
