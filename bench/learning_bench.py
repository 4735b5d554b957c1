"""Shapes-GenEval score against training compute, at fixed checkpoints of one pretraining run.

    python -m bench.learning_bench [--recipe small] [--set section.key=value ...] \\
        [--out bench/results/learning_bench.json] [--run-dir RUN]

It runs the recipe's pipeline with ``pretrain.snapshots=true`` (the EMA model saved at every
``pretrain.sample_every`` step), then scores every snapshot, and the untrained model, under the
recipe's evaluation protocol. Each point holds the step, the training FLOPs and images seen
so far (the compute ledger), the training wall time so far, and the per-category scores.
``--run-dir`` scores the snapshots of an existing pretraining run (one that was stopped, say)
instead of running the pipeline; give the recipe and overrides it ran with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench import common


def _ledger(run_dir: Path) -> dict[int, dict[str, float]]:
    """Step -> the compute ledger's totals at that step (the last metrics event there)."""
    out: dict[int, dict[str, float]] = {}
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if "compute/flops_total" in event.get("metrics", {}):
            out[int(event["step"])] = event["metrics"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = common.parser("learning_bench", __doc__)
    ap.add_argument("--run-dir", default=None, help="score this pretraining run's snapshots")
    args = ap.parse_args(argv)
    overrides = [*args.overrides, "pretrain.snapshots=true"]
    recipe = common.load(args.recipe, overrides)  # first: it sets the env these read
    from lens_model.eval.geneval import (
        EvalProtocol,
        evaluate,
        pipeline_generator,
        untrained_like,
    )
    from lens_model.pipeline import load_pipeline

    protocol = EvalProtocol.from_recipe(recipe.eval)
    pipeline_s: float | None = None  # None: an existing run, scored without running it
    if args.run_dir is None:
        result, pipeline_s = common.run_pipeline(args.recipe, overrides, args.repo)
        run_dir = Path(result["run_dir"])
    else:
        run_dir = Path(args.run_dir)
        if not (run_dir / "snapshots").is_dir():
            raise SystemExit(f"--run-dir {run_dir} has no snapshots/; pass a pretraining run "
                             f"trained with pretrain.snapshots=true")
    ledger = _ledger(run_dir)
    snapshots = sorted((run_dir / "snapshots").glob("step-*"))
    points = []
    for i, snap in enumerate(snapshots):
        step = int(snap.name.removeprefix("step-"))
        pipe = load_pipeline(snap)
        if i == 0:
            base = evaluate(pipeline_generator(untrained_like(pipe, recipe.seed), protocol),
                            protocol)
            points.append({"step": 0, "flops": 0.0, "images": 0.0, "train_s": 0.0,
                           "scores": base.scores})
        report = evaluate(pipeline_generator(pipe, protocol), protocol)
        m = ledger.get(step, {})
        points.append({"step": step, "flops": m.get("compute/flops_total"),
                       "images": m.get("compute/images_total"),
                       "train_s": m.get("compute/wall_s"), "scores": report.scores,
                       "seconds_per_image": report.seconds_per_image})
        print(json.dumps(points[-1], default=float), flush=True)
    out = {"benchmark": "learning_bench", "recipe": args.recipe, "recipe_hash": recipe.hash(),
           "overrides": args.overrides, "eval_hash": protocol.hash(), "points": points,
           "pipeline_s": pipeline_s, "run_dir": str(run_dir), "cpus": os.cpu_count()}
    common.write_json(args.out, out)
    print(f"{len(points)} points -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
