"""Training the small reasoner LM on the world's rules, and measuring how well it follows them.

A training chat is one system prompt (a random subset of the rule library, each rule in a
random phrasing, in random order) and a few user prompts under it, each answered with the
rewrite that applies exactly those rules (:func:`grammar.rewrite`). The model never sees the
rules' effects as code: it must read the system prompt.

Held out, so that the score measures generalisation and not recall: one rule set in eight and
one request content in eight (its shapes, colours, counts and relation, whatever the wording)
are never trained on; :func:`heldout_set` draws only from those.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lens_model.atomic import atomic_dir
from lens_model.reasoner import grammar
from lens_model.reasoner.base import Reasoner
from lens_model.reasoner.grammar import Request
from lens_model.reasoner.lm import build_model, build_tokenizer, collate, encode_chat
from lens_model.reasoner.rules import MAX_RULES, RULES, RuleRef, system_prompt
from lens_model.recipe import ReasonerSection

HELDOUT_BUCKETS = 8  # one rule set and one request content in this many are held out
PLAIN = "plain"  # a request in the world's plain English, next to grammar.KINDS
MAX_POSITIONS = 512
TOKENIZER_CHATS = 4000


def _bucket(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % HELDOUT_BUCKETS


def heldout_rules(names: Iterable[str]) -> bool:
    """Whether a rule set (order and phrasing aside) is kept out of training."""
    return _bucket("rules/" + ",".join(sorted(names))) == 0


def heldout_request(req: Request) -> bool:
    """Whether a request's content (its wording aside) is kept out of training."""
    return _bucket("request/" + grammar.render(grammar.from_spec(grammar.to_spec(req)))) == 0


@dataclass(frozen=True)
class Chat:
    rules: tuple[RuleRef, ...]
    requests: tuple[Request, ...]

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rules]

    @property
    def system(self) -> str:
        return system_prompt(self.rules)

    def turns(self) -> list[tuple[str, str]]:
        return [(grammar.render(q), grammar.rewrite(self.names, q)) for q in self.requests]


def _rule_set(rng: random.Random, heldout: bool) -> tuple[RuleRef, ...]:
    while True:
        names = [n for n in RULES if rng.random() < 0.5][:MAX_RULES]
        if names and heldout_rules(names) == heldout:
            rng.shuffle(names)
            return tuple(RuleRef(n, rng.randrange(len(RULES[n].phrasings))) for n in names)


def _request(rng: random.Random, heldout: bool, kind: str | None = None) -> Request:
    """A request worded one of the hard ways or plainly, each as often (uniform over kinds, not
    over requests: arithmetic and indirect wordings only exist for a few categories)."""
    kind = kind or rng.choice((*grammar.KINDS, PLAIN))
    while True:
        category = rng.choice(grammar.BASES.get(kind, grammar.BASES["language"]))
        req = grammar.sample_request(rng, category)
        if heldout_request(req) == heldout:
            break
    if kind != PLAIN:
        req = grammar.harden(req, kind, rng)
    if rng.random() < 0.3:
        req = replace(req, lead=rng.randrange(len(grammar.LEADS)))
    return req


def sample_chat(rng: random.Random, turns: int, heldout: bool = False) -> Chat:
    """A chat of ``turns`` requests under one system prompt, from the training side or the
    held-out side of both splits."""
    rules = _rule_set(rng, heldout)
    return Chat(rules, tuple(_request(rng, heldout) for _ in range(turns)))


def changes(rule: str, names: Iterable[str], req: Request) -> bool:
    """Whether ``rule`` makes a difference to the rewrite of ``req`` under ``names``."""
    names = set(names)
    return grammar.rewrite(names, req) != grammar.rewrite(names - {rule}, req)


def heldout_set(per_rule: int, seed: int) -> list[tuple[Chat, str]]:
    """``per_rule`` held-out single-turn chats for each rule, each with the rule in its system
    prompt and making a difference to the answer; paired with that rule's name."""
    rng = random.Random(f"reasoner-heldout/{seed}")
    out = []
    for rule in RULES:
        while sum(1 for _, r in out if r == rule) < per_rule:
            rules = _rule_set(rng, heldout=True)
            if rule not in {r.name for r in rules}:
                continue
            req = _request(rng, heldout=True)
            if changes(rule, [r.name for r in rules], req):
                out.append((Chat(rules, (req,)), rule))
    return out


def rule_following(reasoner: Reasoner, examples: list[tuple[Chat, str]]) -> dict[str, float]:
    """Exact-match rate of the reasoner's rewrites per rule (``rule/<name>``) and overall."""
    by_system: dict[str, list[int]] = {}
    for k, (chat, _) in enumerate(examples):
        by_system.setdefault(chat.system, []).append(k)
    right = [False] * len(examples)
    for system, ks in by_system.items():
        turns = [examples[k][0].turns()[0] for k in ks]
        answers = reasoner.rewrite(system, [user for user, _ in turns])
        for k, answer, (_, target) in zip(ks, answers, turns, strict=True):
            right[k] = answer == target
    scores = {}
    for rule in RULES:
        hits = [right[k] for k, (_, r) in enumerate(examples) if r == rule]
        if hits:
            scores[f"rule/{rule}"] = sum(hits) / len(hits)
    scores["exact"] = sum(right) / len(right)
    return scores


def _lr(step: int, section: ReasonerSection) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < section.warmup_steps:
        return section.lr * (step + 1) / section.warmup_steps
    t = (step - section.warmup_steps) / max(1, section.steps - section.warmup_steps)
    return section.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t))))


def train_reasoner(section: ReasonerSection, seed: int, out_dir: Path,
                   log: Callable[[int, float, float], None] | None = None) -> Path:
    """Train the reasoner LM and save it with its tokenizer to ``out_dir`` (atomically).

    ``log(step, loss, lr)`` is called every ``section.log_every`` steps and at the end.
    """
    rng = random.Random(f"reasoner-train/{seed}")
    corpus = []
    for _ in range(TOKENIZER_CHATS):
        chat = sample_chat(rng, 1)
        corpus += [chat.system, *(t for turn in chat.turns() for t in turn)]
    tokenizer = build_tokenizer(corpus, section.vocab_size)
    model = build_model(tokenizer, section.hidden_size, section.layers, section.heads,
                        4 * section.hidden_size, MAX_POSITIONS, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=section.lr, weight_decay=0.01,
                            betas=(0.9, 0.98))
    model.train()
    for step in range(section.steps):
        chats = [sample_chat(rng, section.turns) for _ in range(section.train_batch)]
        batch = collate([encode_chat(tokenizer, c.system, c.turns(), MAX_POSITIONS)
                         for c in chats], tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = _lr(step, section)
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"reasoner training loss is {loss.item()} at step {step}: "
                                     f"lower reasoner.lr (now {section.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log is not None and (step % section.log_every == 0 or step == section.steps - 1):
            log(step, loss.item(), _lr(step, section))
    model.eval()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir
