"""Lens-Turbo's fidelity: the 4-step, CFG-free student against its 20-step CFG teacher.

    python bench/distill_bench.py [--recipe small] [--set section.key=value ...] \\
        [--out bench/results/distill_bench.json]

It runs the recipe's pipeline (data -> ... -> rl -> ... -> distill -> evaluate -> ...); stages
that finished before (the same jobs) are reused, not retrained. The evaluate stage scores the
teacher under the recipe's protocol and the student under the turbo protocol (its own steps,
no CFG) on the same held-out shapes-GenEval prompts and seeds, timing both at the eval size
in the same process. Reported: both score tables, the teacher drawn with the student's steps
and no CFG (what distillation earned over that), the share of the teacher's overall score the
student keeps, the speed-up per image, the distill stage's wall time and the targets: at
least 95% of the teacher's overall score and at least 8x faster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIN_SHARE, MIN_SPEEDUP = 0.95, 8.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="small")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--repo", default=str(REPO), help="the DVC repo the data flow uses")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "distill_bench.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from lens_model import atomic, defaults

    defaults.apply()
    from flows.pipeline import run
    from lens_model.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    start = time.perf_counter()
    result = run(args.recipe, args.overrides, args.repo)
    pipeline_s = time.perf_counter() - start
    turbo, teacher = result["turbo"], result["scores"]
    share = turbo["scores"]["overall"] / max(teacher["overall"], 1e-9)
    out = {"benchmark": "distill_bench", "recipe": args.recipe, "recipe_hash": recipe.hash(),
           "overrides": args.overrides, "cpus": os.cpu_count(),
           "eval_hash": {"teacher": result["eval_hash"], "turbo": turbo["eval_hash"]},
           "teacher": teacher, "turbo": turbo["scores"],
           "teacher_at_turbo_steps": turbo["undistilled_scores"],
           "teacher_seconds_per_image": result["seconds_per_image"],
           "turbo_seconds_per_image": turbo["seconds_per_image"], "speedup": turbo["speedup"],
           "share_of_teacher": share, "student_steps": turbo["steps"],
           "distill_stage_s": result["stages"]["distill"], "stages_s": result["stages"],
           "pipeline_s": pipeline_s, "distill_run_id": turbo["run_id"],
           "turbo_model": f"{turbo['model']}/{turbo['version']}",
           "targets": {"min_share_of_teacher": MIN_SHARE, "min_speedup": MIN_SPEEDUP},
           "within_target": bool(share >= MIN_SHARE and turbo["speedup"] >= MIN_SPEEDUP)}
    atomic.write_text(args.out, json.dumps(out, indent=2, default=float) + "\n")
    print(json.dumps({k: out[k] for k in ("teacher", "turbo", "share_of_teacher", "speedup",
                                          "distill_stage_s", "within_target")}, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
