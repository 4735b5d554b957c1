"""Lens-Turbo's fidelity: the 4-step, CFG-free student against its 20-step CFG teacher.

    python -m bench.distill_bench [--recipe small] [--set section.key=value ...] \\
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

import json

from bench import common

MIN_SHARE, MIN_SPEEDUP = 0.95, 8.0


def main(argv: list[str] | None = None) -> int:
    args = common.parser("distill_bench", __doc__).parse_args(argv)
    recipe = common.load(args.recipe, args.overrides)
    result, pipeline_s = common.run_pipeline(args.recipe, args.overrides, args.repo)
    turbo, teacher = result["turbo"], result["scores"]
    share = turbo["scores"]["overall"] / max(teacher["overall"], 1e-9)
    out = {**common.header("distill_bench", args, recipe),
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
    common.write_json(args.out, out)
    print(json.dumps({k: out[k] for k in ("teacher", "turbo", "share_of_teacher", "speedup",
                                          "distill_stage_s", "within_target")}, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
