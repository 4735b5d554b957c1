"""Per-prompt rubrics: ``{name: check}``, each answered 1 or 0 by a judge; reward = share passed.

A shapes-world check is a JSON dict that the verifier answers exactly:

- ``{"kind": "count", "shape": S, "color": C | None, "count": N}``: exactly N objects of shape S
  (of colour C, when given);
- ``{"kind": "present", "shape": S | None, "color": C | None}``: at least one such object;
- ``{"kind": "color", "shape": S, "color": C}``: there is an S, and every S is C;
- ``{"kind": "size", "shape": S, "size": Z}``: some S is of size class Z;
- ``{"kind": "relation", "a": {"shape": S, "color": C | None}, "type": R, "b": {...}}``: R holds
  between some a and some b;
- ``{"kind": "total", "count": N}``: N objects in all.

Any world can use ``{"kind": "question", "text": "..."}``: a yes/no question a VLM judge answers.
The global rubric ``structural_integrity`` is added by the judge to every prompt (the Lens
paper's RL stage, section 3 of arXiv 2605.21573): no stray, half-drawn or two-colour objects.
"""

from __future__ import annotations

from typing import Any

from lens_model.data.world import COLORS, RELATIONS, SHAPES, SIZES

MAX_RUBRICS = 10  # per prompt, besides the global one
INTEGRITY = "structural_integrity"
KINDS = ("count", "present", "color", "size", "relation", "total", "question")


class RubricError(ValueError):
    """A rubric that no judge can answer; the message names the prompt, the rubric and the fix."""


def _name_ok(value: Any, allowed: tuple[str, ...], what: str, where: str,
             optional: bool = False) -> None:
    if value is None and optional:
        return
    if value not in allowed:
        raise RubricError(f"{where}: {what} {value!r} is not in the shapes world; use "
                          f"{'None or ' if optional else ''}one of: {', '.join(allowed)}")


def _count_ok(value: Any, where: str, low: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise RubricError(f"{where}: count {value!r} must be a whole number >= {low}")


def check_rubric(check: Any, where: str) -> None:
    """Raise a :class:`RubricError` naming ``where`` when ``check`` is malformed."""
    if not isinstance(check, dict) or check.get("kind") not in KINDS:
        raise RubricError(f"{where}: a check must be a dict with 'kind' one of "
                          f"{', '.join(KINDS)}; got {check!r}")
    kind = check["kind"]
    if kind == "question":
        if not isinstance(check.get("text"), str) or not check["text"].strip():
            raise RubricError(f"{where}: a question check needs a non-empty 'text'")
        return
    colors, shapes = tuple(COLORS), SHAPES
    if kind in ("count", "color", "size"):
        _name_ok(check.get("shape"), shapes, "shape", where)
    if kind == "count":
        _name_ok(check.get("color"), colors, "colour", where, optional=True)
        _count_ok(check.get("count"), where)
    elif kind == "present":
        _name_ok(check.get("shape"), shapes, "shape", where, optional=True)
        _name_ok(check.get("color"), colors, "colour", where, optional=True)
        if check.get("shape") is None and check.get("color") is None:
            raise RubricError(f"{where}: a present check names a shape, a colour or both")
    elif kind == "color":
        _name_ok(check.get("color"), colors, "colour", where)
    elif kind == "size":
        _name_ok(check.get("size"), tuple(SIZES), "size", where)
    elif kind == "relation":
        _name_ok(check.get("type"), RELATIONS, "relation", where)
        for side in ("a", "b"):
            ref = check.get(side)
            if not isinstance(ref, dict):
                raise RubricError(f"{where}: relation side {side!r} must be "
                                  "{'shape': S, 'color': C or None}")
            _name_ok(ref.get("shape"), shapes, "shape", f"{where} side {side}")
            _name_ok(ref.get("color"), colors, "colour", f"{where} side {side}", optional=True)
    elif kind == "total":
        _count_ok(check.get("count"), where, low=1)


def check_rubrics(rubrics: Any, prompt_id: str) -> None:
    """A prompt's rubrics: 1 to MAX_RUBRICS named checks, none named like the global one."""
    where = f"prompt {prompt_id!r}"
    if not isinstance(rubrics, dict) or not rubrics:
        raise RubricError(f"{where} has no rubric; give it 1 to {MAX_RUBRICS} "
                          "{name: check} rubrics")
    if len(rubrics) > MAX_RUBRICS:
        raise RubricError(f"{where} has {len(rubrics)} rubrics; keep at most {MAX_RUBRICS}")
    for name, check in rubrics.items():
        if not isinstance(name, str) or not name or name == INTEGRITY:
            raise RubricError(f"{where}: rubric name {name!r} must be a non-empty string other "
                              f"than {INTEGRITY!r} (the judge adds that one)")
        check_rubric(check, f"{where} rubric {name!r}")
