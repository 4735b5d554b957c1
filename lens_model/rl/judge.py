"""Judges: each rubric of a prompt answered 1 or 0 for one image; reward = share passed.

``ShapesJudge`` answers the shapes-world checks of :mod:`lens_model.rl.rubrics` exactly, from
the verifier's detections, plus the global ``structural_integrity`` rubric: no stray object
(one the prompt's spec does not ask for), no half-drawn object (its best shape template fits
worse than ``HALF_DRAWN``) and no two-colour object (two colours' regions touching).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from lens_model.data.world import Obj, relation
from lens_model.eval.verifier import Detection, read_scene
from lens_model.rl.rubrics import INTEGRITY

# A drawn object whose best shape template overlaps it less than this is half-drawn: every
# object of shapes-GenEval's ground-truth renders at 32x32 and 40x24 fits its template at 0.65
# soft IoU or better (median 0.92); a blob between two shapes fits none well.
HALF_DRAWN = 0.6


@dataclass(frozen=True)
class Verdict:
    """One image's answers: rubric name -> passed, with the judge's reason for each."""

    passed: dict[str, bool]
    reasons: dict[str, str]

    @property
    def reward(self) -> float:
        return sum(self.passed.values()) / len(self.passed)


class Judge(Protocol):
    def judge(self, images: list[Image.Image], rubrics: list[dict[str, dict]],
              specs: list[dict | None]) -> list[Verdict | None]:
        """One verdict per image; None where the judge failed (a failed rollout, not a 0)."""
        ...


def _matches(o: Obj, ref: dict[str, Any]) -> bool:
    return (ref.get("shape") in (None, o.shape)) and (ref.get("color") in (None, o.color))


def answer(check: dict[str, Any], objects: tuple[Obj, ...]) -> bool:
    """A shapes-world check answered on the detected objects."""
    kind = check["kind"]
    if kind == "count":
        return sum(_matches(o, check) for o in objects) == check["count"]
    if kind == "present":
        return any(_matches(o, check) for o in objects)
    if kind == "color":
        of_shape = [o for o in objects if o.shape == check["shape"]]
        return bool(of_shape) and all(o.color == check["color"] for o in of_shape)
    if kind == "size":
        return any(o.shape == check["shape"] and o.size == check["size"] for o in objects)
    if kind == "relation":
        return any(check["type"] in relation(a, b)
                   for a in objects if _matches(a, check["a"])
                   for b in objects if _matches(b, check["b"]))
    if kind == "total":
        return len(objects) == check["count"]
    raise ValueError(f"check kind {kind!r} needs a VLM judge (rl.judge: openai); the shapes "
                     f"judge answers count, present, color, size, relation and total")


def _touch(a: Detection, b: Detection) -> bool:
    """Bounding boxes overlap or touch (end-exclusive boxes, one pixel of slack)."""
    return not (a.bbox[2] < b.bbox[0] or b.bbox[2] < a.bbox[0]
                or a.bbox[3] < b.bbox[1] or b.bbox[3] < a.bbox[1])


def integrity(detections: list[Detection], spec: dict | None) -> tuple[bool, str]:
    """No stray, half-drawn or two-colour objects; the reason names the first fault."""
    for d in detections:
        if d.match < HALF_DRAWN:
            return False, f"half-drawn {d.color} {d.shape} (fit {d.match:.2f})"
    for i, a in enumerate(detections):
        for b in detections[i + 1:]:
            if a.color != b.color and _touch(a, b):
                return False, f"two-colour object: {a.color} {a.shape} touches {b.color} {b.shape}"
    if spec is not None:
        for d in detections:
            if not any(item["shape"] == d.shape and item["color"] in (None, d.color)
                       for item in spec["objects"]):
                return False, f"stray {d.color} {d.shape}"
    return True, "whole, single-colour objects, none stray"


class ShapesJudge:
    """Exact answers from the shapes-world verifier."""

    def judge(self, images: list[Image.Image], rubrics: list[dict[str, dict]],
              specs: list[dict | None]) -> list[Verdict | None]:
        out: list[Verdict | None] = []
        for image, named, spec in zip(images, rubrics, specs, strict=True):
            detections, scene = read_scene(image)
            passed = {name: answer(check, scene.objects) for name, check in named.items()}
            found = ", ".join(f"{o.size} {o.color} {o.shape}" for o in scene.objects) or "nothing"
            reasons = {name: f"{'pass' if ok else 'fail'}: found {found}"
                       for name, ok in passed.items()}
            passed[INTEGRITY], reasons[INTEGRITY] = integrity(detections, spec)
            out.append(Verdict(passed, reasons))
        return out
