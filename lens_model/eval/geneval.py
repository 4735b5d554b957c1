"""Shapes-GenEval: a fixed, versioned prompt set scored by the verifier under a fixed protocol.

The protocol (prompt-set version and seed, prompts per category, size, steps, CFG, seed) is
frozen in an :class:`EvalProtocol` whose hash goes with every score, so two scores compare
only when their hashes match. Image ``i`` is drawn from seed ``protocol.seed + i`` alone, so
a score does not depend on batch size. The report holds per-category accuracy and overall
(the mean over categories, as GenEval), every prompt's verdict and reason, and the latency.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from lens_model.data.captions import Prompt, prompt_set
from lens_model.data.loader import to_signed
from lens_model.data.world import BACKGROUNDS, PATTERNS, render
from lens_model.eval.verifier import score, verify
from lens_model.pipeline import LensPipeline, parse_size
from lens_model.reasoner.grammar import prompt_set_r
from lens_model.recipe import EvalSection
from lens_model.text_encoder import TextConnector
from lens_model.transformer import LensTransformer2DModel

PROMPT_SET_VERSION = "shapes-geneval/1"  # bump when prompt_set or the verifier changes
R_PROMPT_SET_VERSION = "shapes-geneval-r/1"  # the prompts that need a reasoner (grammar.py)

# prompts and per-image seeds -> one RGB image each
Generate = Callable[[list[str], list[int]], list[Image.Image]]


@dataclass(frozen=True)
class EvalProtocol:
    """Everything that fixes a score: which prompts, and how images are drawn."""

    prompts_per_category: int = 20
    prompt_seed: int = 0
    width: int = 32
    height: int = 32
    steps: int = 20
    cfg: float = 4.0
    sampler: str = "euler"
    seed: int = 0
    version: str = PROMPT_SET_VERSION

    @classmethod
    def from_recipe(cls, section: EvalSection,
                    version: str = PROMPT_SET_VERSION) -> EvalProtocol:
        """The protocol of a recipe's ``eval`` section, on the prompt set ``version``."""
        width, height = parse_size(section.size)
        return cls(section.prompts_per_category, section.prompt_seed, width, height,
                   section.steps, section.cfg, section.sampler, section.seed, version)

    @classmethod
    def from_params(cls, params: dict[str, str]) -> EvalProtocol:
        """The protocol an evaluation run logged as ``eval.<field>`` MLflow params."""
        missing = [f"eval.{f.name}" for f in fields(cls) if f"eval.{f.name}" not in params]
        if missing:
            raise ValueError(f"the evaluation run logged no {', '.join(missing)}; it predates "
                             f"this protocol version, so name a recipe whose protocol to use")
        return cls(**{f.name: type(f.default)(params[f"eval.{f.name}"]) for f in fields(cls)})

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def prompts(self) -> list[Prompt]:
        if self.version == R_PROMPT_SET_VERSION:
            return prompt_set_r(self.prompts_per_category, self.prompt_seed)
        if self.version != PROMPT_SET_VERSION:
            raise ValueError(f"prompt set {self.version!r} is unknown; this code has "
                             f"{PROMPT_SET_VERSION} and {R_PROMPT_SET_VERSION}")
        return prompt_set(self.prompts_per_category, self.prompt_seed)


@dataclass
class EvalReport:
    """Scores and per-prompt verdicts of one evaluation."""

    protocol: EvalProtocol
    scores: dict[str, float]  # per category and "overall"
    results: list[dict[str, Any]]  # category, prompt, passed, reason
    seconds_per_image: float
    images: list[Image.Image] = field(repr=False, default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"protocol": asdict(self.protocol), "protocol_hash": self.protocol.hash(),
                "scores": self.scores, "seconds_per_image": self.seconds_per_image,
                "results": self.results}


def evaluate(generate: Generate, protocol: EvalProtocol, batch_size: int = 32,
             prompts: list[Prompt] | None = None) -> EvalReport:
    """Generate every prompt's image, verify it and score the categories; ``prompts``
    replaces the protocol's own (a dev set), under its sampling settings and seeds."""
    prompts = protocol.prompts() if prompts is None else prompts
    if not prompts:
        raise ValueError("evaluate got no prompts: give at least one")
    images: list[Image.Image] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        part = prompts[i:i + batch_size]
        got = generate([p.text for p in part], [protocol.seed + i + j for j in range(len(part))])
        if len(got) != len(part):
            raise ValueError(f"the generator returned {len(got)} images for {len(part)} "
                             f"prompts; it must return one image per prompt")
        images.extend(got)
    seconds = (time.perf_counter() - start) / len(prompts)
    results = []
    for p, image in zip(prompts, images, strict=True):
        passed, reason = verify(image, p.spec)
        results.append({"category": p.category, "prompt": p.text, "passed": passed,
                        "reason": reason})
    scores = score([(r["category"], r["passed"]) for r in results])
    return EvalReport(protocol, scores, results, seconds, images)


def pipeline_generator(pipe: LensPipeline, protocol: EvalProtocol) -> Generate:
    """The protocol's sampling settings applied to ``pipe``, on the prompts as given: a
    reasoner saved with the model is not used (the search scores it explicitly)."""
    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        return pipe(prompts, width=protocol.width, height=protocol.height,
                    num_inference_steps=protocol.steps, guidance_scale=protocol.cfg,
                    seed=seeds, sampler=protocol.sampler, reasoner=False).images
    return generate


def untrained_like(pipe: LensPipeline, seed: int = 0) -> LensPipeline:
    """The same pipeline with a freshly initialised backbone and connector: the baseline
    that shows how much of a score training earned, under the same protocol."""
    torch.manual_seed(seed)
    transformer = LensTransformer2DModel.from_config(pipe.transformer.config)
    connector = TextConnector.from_config(pipe.connector.config)
    parts = {**pipe.components, "transformer": transformer, "connector": connector}
    return LensPipeline(**parts, layers=pipe.config.layers, max_length=pipe.config.max_length,
                        trained_areas=pipe.config.trained_areas)


def reconstruction_ceiling(reconstruct: Callable[[Tensor], Tensor], protocol: EvalProtocol,
                           backgrounds: Sequence[str] = tuple(BACKGROUNDS),
                           patterns: Sequence[str] = PATTERNS) -> dict[str, float]:
    """The scores of the prompts' ground-truth renders after an autoencoder round trip
    (``reconstruct``: (1, 3, H, W) in [-1, 1] -> the same): the most any model drawing in
    that autoencoder's latent space can score under ``protocol``.

    Scenes are drawn in the world the model was trained on: a background or pattern outside
    ``backgrounds``/``patterns`` (the recipe's) becomes the first of them.
    """
    results = []
    with torch.no_grad():
        for p in protocol.prompts():
            scene = replace(
                p.scene,
                background=p.scene.background if p.scene.background in backgrounds
                else backgrounds[0],
                pattern=p.scene.pattern if p.scene.pattern in patterns else patterns[0])
            pixels = np.asarray(render(scene, protocol.width, protocol.height))
            x = to_signed(pixels.transpose(2, 0, 1))[None]  # (1, 3, H, W) in [-1, 1]
            y = ((reconstruct(x).clamp(-1, 1)[0] + 1) * 127.5).round().byte()
            image = Image.fromarray(y.permute(1, 2, 0).cpu().numpy())
            results.append((p.category, verify(image, p.spec)[0]))
    return score(results)


def report_grid(report: EvalReport, per_row: int = 10, scale: int = 3) -> Image.Image:
    """Every image enlarged, its prompt under it and a green (pass) or red (fail) frame."""
    w, h = report.protocol.width * scale, report.protocol.height * scale
    cell_w, text_h, pad = max(w, 120), 30, 4
    rows = -(-len(report.images) // per_row)
    grid = Image.new("RGB", (per_row * (cell_w + pad), rows * (h + text_h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, r) in enumerate(zip(report.images, report.results, strict=True)):
        x, y = (i % per_row) * (cell_w + pad), (i // per_row) * (h + text_h + pad)
        grid.paste(image.resize((w, h), Image.Resampling.NEAREST), (x, y))
        colour = (30, 150, 60) if r["passed"] else (200, 40, 40)
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=colour, width=2)
        text = r["prompt"].removeprefix("a photo of ")
        lines = [text[k:k + 24] for k in range(0, len(text), 24)][:2]
        for n, line in enumerate(lines):
            draw.text((x, y + h + 2 + 12 * n), line, fill=(0, 0, 0))
    return grid
