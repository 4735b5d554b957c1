"""What every reasoner backend shares: the interface, the system-prompt check, and the one
place raw model answers become final rewrites.

A reasoner rewrites a user's image prompt following a *system prompt* (a list of rule
sentences, see :mod:`lens_model.reasoner.rules`). Backends differ in where the language model
runs (a local Hugging Face model, an OpenAI-compatible endpoint); they must agree on what
counts as a usable answer, so that scores of a system prompt do not depend on the backend's
quirks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)
LIMIT_KEY = "reasoner.max_system_chars"


@runtime_checkable
class Reasoner(Protocol):
    """Rewrites image prompts according to a system prompt; ``stats`` counts what happened
    (at least ``rewrites`` and ``empty``) over the reasoner's life."""

    stats: dict[str, int]

    def rewrite(self, system_prompt: str, prompts: list[str]) -> list[str]: ...


def new_stats(*extra: str) -> dict[str, int]:
    """The counters every backend keeps, plus its own ``extra`` ones, all at zero."""
    return {"rewrites": 0, "empty": 0, **dict.fromkeys(extra, 0)}


def check_system_prompt(text: str, max_chars: int) -> str:
    """``text`` stripped, or a ValueError: an empty prompt would make the model rewrite by
    whim, and an over-long one costs every call and may overflow the model's context."""
    stripped = text.strip()
    if not stripped:
        raise ValueError(
            "the reasoner's system prompt is empty: give it at least one rule "
            "sentence (the search should never propose an empty prompt)"
        )
    if len(stripped) > max_chars:
        raise ValueError(
            f"the reasoner's system prompt is {len(stripped)} characters, over the "
            f"limit of {max_chars} ({LIMIT_KEY}): shorten it (fewer or shorter "
            f"rules) or raise {LIMIT_KEY} in the recipe"
        )
    return stripped


def finish_rewrites(
    prompts: Sequence[str], answers: Sequence[str], stats: dict[str, int]
) -> list[str]:
    """The final rewrites from raw ``answers``, one per prompt, in order.

    An empty answer is replaced by the user's own prompt (an empty image prompt is never what
    anyone wants), counted in ``stats["empty"]`` and logged, so that a reasoner which keeps
    answering nothing shows up instead of scoring as if it had done nothing wrong.
    """
    if len(prompts) != len(answers):
        raise ValueError(
            f"{len(answers)} answers for {len(prompts)} prompts: a backend must "
            "answer every prompt once"
        )
    out = []
    for prompt, answer in zip(prompts, answers, strict=True):
        text = answer.strip()
        if not text:
            stats["empty"] = stats.get("empty", 0) + 1
            log.warning(
                "the reasoner answered nothing for the prompt %r: kept the prompt as it was", prompt
            )
            text = prompt
        out.append(text)
    stats["rewrites"] = stats.get("rewrites", 0) + len(out)
    return out
