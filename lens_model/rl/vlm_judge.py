"""A VLM judge on an OpenAI-compatible endpoint: one chat per image, 1/0 per rubric.

Each image goes as a PNG data URL with its prompt's rubric questions and the global rubric
``rubrics.INTEGRITY``; the answer is JSON ``{name: 0 | 1}``. Shapes-world checks are asked
as plain questions too, so any world can be judged this way. An image whose answer stays
unusable after the endpoint's retries gets ``None``: the caller logs a failed rollout, never
a silent zero.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from lens_model.data.world import PLURALS
from lens_model.recipe import EndpointSection
from lens_model.rl.judge import Verdict
from lens_model.rl.llm import LLMError, chat_json, resolve
from lens_model.rl.rubrics import INTEGRITY

log = logging.getLogger(__name__)
INTEGRITY_QUESTION = ("Is every object whole and cleanly drawn, with no stray, half-drawn or "
                      "malformed objects and no object of two colours?")
SYSTEM = ("You judge generated images. For each numbered rubric answer 1 if the image "
          "clearly satisfies it, else 0. Reply with one JSON object mapping each rubric name "
          "to 0 or 1, and nothing else.")


def _thing(ref: dict[str, Any], n: int = 1) -> str:
    noun = PLURALS[ref["shape"]] if n != 1 else ref["shape"]
    return f"{ref['color']} {noun}" if ref.get("color") else noun


def question(check: dict[str, Any]) -> str:
    """A yes/no question that asks what ``check`` checks."""
    kind = check["kind"]
    if kind == "question":
        return check["text"]
    if kind == "count":
        return f"Are there exactly {check['count']} {_thing(check, check['count'])}?"
    if kind == "present":
        what = _thing(check) if check.get("shape") else f"{check['color']} object"
        return f"Is there at least one {what}?"
    if kind == "color":
        return f"Is there a {check['shape']}, and is every {check['shape']} {check['color']}?"
    if kind == "size":
        return f"Is some {check['shape']} {check['size']} (relative to the frame)?"
    if kind == "relation":
        return f"Is a {_thing(check['a'])} {check['type']} a {_thing(check['b'])}?"
    if kind == "total":
        return f"Are there exactly {check['count']} objects in the image in all?"
    raise ValueError(f"rubric kind {kind!r} has no question")


def png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _verdicts(answer: dict[str, Any], names: list[str]) -> dict[str, bool]:
    """The answer as ``{name: bool}``; a ValueError (so the call is retried) if unusable."""
    out = {}
    for name in names:
        value = answer.get(name)
        if isinstance(value, bool) or value in (0, 1):
            out[name] = bool(value)
        elif isinstance(value, str) and value.strip() in ("0", "1"):
            out[name] = value.strip() == "1"
        else:
            raise ValueError(f"rubric {name!r} got {value!r}; expected 0 or 1")
    return out


class OpenAIJudge:
    """Judge images against rubrics through ``endpoint`` (``workers`` calls at a time)."""

    def __init__(self, endpoint: EndpointSection, workers: int = 8) -> None:
        resolve(endpoint)  # a missing URL or model is a setup error, not a failed rollout
        self.endpoint = endpoint
        self.workers = workers

    def messages(self, image: Image.Image, rubrics: dict[str, dict]) -> list[dict[str, Any]]:
        questions = {name: question(check) for name, check in rubrics.items()}
        questions[INTEGRITY] = INTEGRITY_QUESTION
        text = "Rubrics (name: question):\n" + json.dumps(questions, indent=1) + \
            "\nAnswer as JSON: {" + ", ".join(f'"{n}": 0 or 1' for n in questions) + "}"
        return [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [
                    {"type": "text", "text": text},
                    {"type": "image_url", "image_url": {"url": png_data_url(image)}}]}]

    def judge_one(self, image: Image.Image, rubrics: dict[str, dict],
                  what: str = "judge image") -> Verdict | None:
        names = [*rubrics, INTEGRITY]
        try:
            passed = chat_json(self.endpoint, self.messages(image, rubrics), what,
                               check=lambda answer: _verdicts(answer, names), temperature=0)
        except LLMError as exc:
            log.warning("%s", exc)
            return None
        return Verdict(passed, {name: f"{self.endpoint.model or 'VLM'} answered "
                                f"{int(ok)}" for name, ok in passed.items()})

    def judge(self, images: list[Image.Image], rubrics: list[dict[str, dict]],
              specs: list[dict | None] | None = None) -> list[Verdict | None]:
        """Per image, a verdict on its rubrics and ``INTEGRITY``, or None on failure. The
        prompts' ``specs`` are not read: the VLM judges from the image alone."""
        if len(images) != len(rubrics):
            raise ValueError(f"{len(images)} images but {len(rubrics)} rubric sets; give one "
                             "rubric set per image")
        with ThreadPoolExecutor(max(1, min(self.workers, len(images)))) as pool:
            return list(pool.map(lambda i: self.judge_one(images[i], rubrics[i],
                                                           f"judge image {i}"),
                                 range(len(images))))
