"""Side-by-side comparison of two pipeline runs for reviewers: params that differ, lineage,
eval scores per category, the compute ledger, the reasoner's test scores and its system
prompts as a diff, and one image grid of both models drawn from
the same prompts and seeds.

A side is a run id (the pipeline's parent run or any of its stage runs) or ``NAME/VERSION``
of a registered model; either resolves to the pipeline's parent run and its stage runs.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from PIL import Image, ImageDraw

import mlflow
from lens_model import atomic
from lens_model.eval.geneval import EvalProtocol, pipeline_generator
from lens_model.pipeline import load_pipeline
from lens_model.reasoner.search import prompt_hash
from lens_model.secrets import redact
from tasks.registry import local_model

GRID_PER_CATEGORY = 2


@dataclass
class Side:
    label: str
    parent: Run
    stages: dict[str, Run]  # stage name -> its run
    model: str  # a model folder or models:/ URI to draw the grid with


def _run(client: mlflow.MlflowClient, run_id: str, what: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"{what}: no MLflow run {run_id!r} in "
                         f"{redact(mlflow.get_tracking_uri())}; pass a pipeline or stage run "
                         "id, or NAME/VERSION of a registered model") from None


def resolve(ref: str) -> Side:
    """A run id or NAME/VERSION -> its pipeline's parent run, stage runs and model."""
    client = mlflow.MlflowClient()
    model = None
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        try:
            mv = client.get_model_version(name, version)
        except MlflowException:
            raise ValueError(f"{ref!r}: model {name!r} has no version {version!r}; pass "
                             "NAME/VERSION of a registered model or a run id") from None
        run, model = _run(client, mv.run_id, ref), f"models:/{name}/{version}"
    else:
        run = _run(client, ref, ref)
    parent_id = run.data.tags.get("lens.parent_run_id") or run.info.run_id
    parent = _run(client, parent_id, ref)
    # The parent names every stage's run, cached ones (run by an earlier pipeline) included.
    stages = {k.removeprefix("lens.run."): _run(client, v, ref)
              for k, v in parent.data.tags.items() if k.startswith("lens.run.")}
    model = model or parent.data.tags.get("lens.model_dir") or ""
    if not model:
        raise ValueError(f"{ref!r}: its pipeline run {parent.info.run_id} names no model "
                         "(no lens.model_dir tag); compare finished pipeline runs")
    return Side(ref, parent, stages, model)


def _params(side: Side) -> dict[str, str]:
    out: dict[str, str] = {}
    for run in side.stages.values():
        out.update(run.data.params)
    return out


def _prefixed(side: Side, stage: str, prefix: str) -> dict[str, float]:
    run = side.stages.get(stage)
    return {k: v for k, v in (run.data.metrics if run else {}).items() if k.startswith(prefix)}


def _system_prompt(side: Side) -> str | None:
    """The system prompt the side's search chose, or None when it ran no search."""
    run = side.stages.get("search")
    if run is None:
        return None
    return mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/system_prompt.txt")


def prompt_diff(a: str | None, b: str | None) -> dict[str, Any]:
    """Both system prompts' hashes and a unified diff, line by line (rules are lines)."""
    hashes = [prompt_hash(p) if p is not None else None for p in (a, b)]
    diff = list(difflib.unified_diff((a or "").splitlines(), (b or "").splitlines(),
                                     "A", "B", lineterm="", n=1))
    return {"hashes": hashes, "diff": diff}


def compare(a: str, b: str) -> dict[str, Any]:
    """The comparison as plain data (what ``lens compare --json`` prints)."""
    sa, sb = resolve(a), resolve(b)
    pa, pb = _params(sa), _params(sb)
    differ = {k: [pa.get(k), pb.get(k)] for k in sorted(set(pa) | set(pb))
              if pa.get(k) != pb.get(k)}
    lineage = {k: [sa.parent.data.tags.get(k), sb.parent.data.tags.get(k)]
               for k in sorted({*sa.parent.data.tags, *sb.parent.data.tags})
               if k.startswith("lens.")}
    tables = {}
    for key, stage, prefix in (("scores", "evaluate", "eval/"),
                               ("baseline", "evaluate", "baseline/"),
                               ("compute", "pretrain", "compute/"),
                               ("reasoner", "search", "test/")):
        ma, mb = _prefixed(sa, stage, prefix), _prefixed(sb, stage, prefix)
        tables[key] = {k: [ma.get(k), mb.get(k)] for k in sorted(set(ma) | set(mb))}
    ev = sa.stages.get("evaluate")  # side A's protocol draws the grid unless told otherwise
    protocol = asdict(EvalProtocol.from_params(ev.data.params)) if ev else None
    return {"a": {"ref": a, "parent_run_id": sa.parent.info.run_id, "model": sa.model},
            "b": {"ref": b, "parent_run_id": sb.parent.info.run_id, "model": sb.model},
            "params_differ": differ, "lineage": lineage, "protocol": protocol, **tables,
            "system_prompt": prompt_diff(_system_prompt(sa), _system_prompt(sb))}


def side_by_side_grid(sides: dict[str, str], protocol: EvalProtocol, out: Path,
                      scale: int = 3) -> Path:
    """Both models on the same prompts and seeds, one row each (label -> model, as
    :func:`compare` resolved them in ``result[side]["model"]``), A above B."""
    prompts = protocol.prompts()
    picked: list[str] = []
    for cat in dict.fromkeys(p.category for p in prompts):
        picked += [p.text for p in prompts if p.category == cat][:GRID_PER_CATEGORY]
    seeds = [protocol.seed + i for i in range(len(picked))]
    rows = [pipeline_generator(load_pipeline(local_model(model)), protocol)(picked, seeds)
            for model in sides.values()]
    w, h = protocol.width * scale, protocol.height * scale
    label_w = 80
    grid = Image.new("RGB", (label_w + w * len(picked), 2 * h + 14), "white")
    draw = ImageDraw.Draw(grid)
    for r, (ref, images) in enumerate(zip(sides, rows, strict=True)):
        draw.text((2, r * h + h // 2), ref[:12], fill=(0, 0, 0))
        for i, image in enumerate(images):
            grid.paste(image.resize((w, h), Image.Resampling.NEAREST), (label_w + i * w, r * h))
    for i in range(len(picked)):
        draw.text((label_w + i * w + 2, 2 * h + 1), str(i), fill=(0, 0, 0))
    atomic.write_with(out, lambda tmp: grid.save(tmp, format="PNG"))
    legend = [f"{i}: {p} (seed {s})" for i, (p, s) in enumerate(zip(picked, seeds, strict=True))]
    atomic.write_text(out.with_suffix(".txt"), "\n".join(legend) + "\n")
    return out
