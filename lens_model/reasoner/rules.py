"""The library of rule sentences a reasoner's system prompt is made of, in the shapes world.

A system prompt is the :data:`HEADER` followed by one sentence per rule, one per line. Each
rule has a few phrasings (the edit search may reword a rule into another) and names the
prompt categories it is written for (the edit search adds rules for the categories that
fail). Whether a rule *helps* is not written here: some rules hurt, and only scoring a
candidate tells them apart, as in a real system prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

HEADER = "You rewrite requests for a picture of simple shapes into a prompt for the image model."
MAX_RULES = 10


@dataclass(frozen=True)
class Rule:
    name: str
    phrasings: tuple[str, ...]
    targets: tuple[str, ...]  # the prompt categories it is written for


RULES: dict[str, Rule] = {r.name: r for r in (
    Rule("arithmetic", ("Work out any sum or difference and write the number as a word.",
                        "Resolve simple arithmetic, so 1 + 2 becomes three.",
                        "Replace every calculation with its result in words."),
         ("arithmetic",)),
    Rule("english", ("Translate the request into English.",
                     "Always answer in English, whatever the language of the request.",
                     "Write the prompt in English even when the request is French, German "
                     "or Spanish."),
         ("language",)),
    Rule("canonical", ("Use the plain names of the colours and shapes.",
                       "Replace fancy colour words and shape names with the simple ones.",
                       "Call every colour and shape by its common name."),
         ("synonym",)),
    Rule("counted", ("Name each repeated subject once, with its count.",
                     "When a shape is listed several times, say how many there are instead.",
                     "Group repeated shapes into one phrase with a number."),
         ("repeat", "counting")),
    Rule("relation", ("State where the shapes are with left of, right of, above or below.",
                      "Make the position explicit, as in a circle left of a star.",
                      "Say the spatial relation directly between the two shapes."),
         ("indirect", "position")),
    Rule("photo", ("Begin with a photo of and drop any polite filler.",
                   "Start the prompt with a photo of and leave out requests like please.",
                   "Open with a photo of and cut words that are not about the picture."),
         ("single_object", "two_object", "colors", "color_attr")),
    Rule("long", ("Write a long, detailed caption in the style the model was trained on.",
                  "Expand the prompt into a full descriptive caption.",
                  "Describe the picture at length, sentence by sentence."),
         ("single_object", "two_object", "counting", "colors", "position", "color_attr")),
    Rule("no_color", ("Leave out the colours to keep the prompt short.",
                      "Do not mention colours.",
                      "Keep only the shapes and drop colour words."),
         ("single_object", "two_object", "counting", "position")),
    Rule("first_only", ("Focus on the main subject and describe only the first shape.",
                        "Mention just one shape, the first one named.",
                        "Keep the prompt to a single subject."),
         ("single_object", "colors")),
)}


@dataclass(frozen=True)
class RuleRef:
    """One sentence of a system prompt: a rule and the phrasing used."""

    name: str
    phrasing: int = 0

    @property
    def text(self) -> str:
        return RULES[self.name].phrasings[self.phrasing]


def system_prompt(rules: Sequence[RuleRef]) -> str:
    """The header and one rule sentence per line, in the given order."""
    names = [r.name for r in rules]
    for r in rules:
        if r.name not in RULES:
            raise ValueError(f"rule {r.name!r} is unknown; use one of: {', '.join(RULES)}")
        if not 0 <= r.phrasing < len(RULES[r.name].phrasings):
            raise ValueError(f"rule {r.name!r} has no phrasing {r.phrasing}; it has "
                             f"{len(RULES[r.name].phrasings)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a system prompt names each rule once; got {names}")
    return "\n".join([HEADER, *(r.text for r in rules)])


_BY_TEXT = {text: RuleRef(r.name, i) for r in RULES.values() for i, text in enumerate(r.phrasings)}


def parse(text: str) -> tuple[list[RuleRef], list[str]]:
    """The library rules a system prompt holds, in order, and its other lines (header aside)."""
    known, other = [], []
    for line in (s.strip() for s in text.splitlines()):
        if not line or line == HEADER:
            continue
        if line in _BY_TEXT:
            known.append(_BY_TEXT[line])
        else:
            other.append(line)
    return known, other
