"""The reasoner's effect: shapes-GenEval-R and shapes-GenEval with and without it, one run.

    python -m bench.reasoner_bench [--recipe small] [--set section.key=value ...] \\
        [--long-caption-prob 0.5 [--long-only]] [--out bench/results/reasoner_bench.json]

It runs the recipe's pipeline (data -> ... -> rl -> reasoner -> search -> ...; stages that
exist are reused) and reads the search stage's report on the held-out test split, which the
search never scored: shapes-GenEval-R with no reasoner, with the seed system prompt and with
the searched one, and plain shapes-GenEval with no reasoner and with the searched prompt.
``r_literal_gain`` is the most any rewrite could gain: each shapes-GenEval-R prompt drawn
from the plain wording of its spec, minus no reasoner.
Targets: searched - none >= +0.30 and searched - seed >= +0.05 on shapes-GenEval-R, and
plain shapes-GenEval down by at most 0.02. With ``--long-caption-prob P`` it runs the recipe a
second time with ``pretrain.short_caption_prob=1-P`` (a model trained on long captions too)
and reports its plain scores with and without the reasoner, and whether its searched prompt
holds the long-caption rule. ``--long-only`` runs that second model alone: on the ``small``
recipe each side is a pipeline of its own (about two hours on two CPU cores), so the two can
be run apart.
"""

from __future__ import annotations

import json
from typing import Any

from bench import common

MIN_GAIN_NONE, MIN_GAIN_SEED, MAX_PLAIN_DROP = 0.30, 0.05, 0.02


def _side(recipe: str, overrides: list[str], repo: str) -> dict[str, Any]:
    """Run the pipeline once and return its reasoner figures and wall time."""
    from lens_model.reasoner.rules import parse

    result, pipeline_s = common.run_pipeline(recipe, overrides, repo)
    r = result["reasoner"]
    test = r["test"]
    rules = [ref.name for ref in parse(r["system_prompt"])[0]]
    return {"system_prompt": r["system_prompt"], "system_prompt_hash": r["hash"],
            "rules": rules, "heldout_rule_following": r["heldout"], "curve": r["curve"],
            "test": test,
            "r_gain_vs_none": test["r/searched"]["overall"] - test["r/none"]["overall"],
            "r_gain_vs_seed": test["r/searched"]["overall"] - test["r/seed"]["overall"],
            "r_literal_gain": test["r/literal"]["overall"] - test["r/none"]["overall"],
            "plain_change": test["plain/searched"]["overall"] - test["plain/none"]["overall"],
            "stages_s": result["stages"], "search_run_id": result.get("run.search"),
            "pipeline_s": pipeline_s}


def main(argv: list[str] | None = None) -> int:
    ap = common.parser("reasoner_bench", __doc__)
    ap.add_argument("--long-caption-prob", type=float, default=None,
                    help="also run a model trained with this share of long captions")
    ap.add_argument("--long-only", action="store_true",
                    help="run only the long-caption model (needs --long-caption-prob)")
    args = ap.parse_args(argv)
    if args.long_caption_prob is not None and not 0 < args.long_caption_prob <= 1:
        ap.error(f"--long-caption-prob {args.long_caption_prob}: give a share in (0, 1]")
    if args.long_only and args.long_caption_prob is None:
        ap.error("--long-only runs the long-caption model alone: give --long-caption-prob P")
    recipe = common.load(args.recipe, args.overrides)
    out: dict[str, Any] = common.header("reasoner_bench", args, recipe)
    summary: dict[str, Any] = {}
    if not args.long_only:
        main_side = _side(args.recipe, args.overrides, args.repo)
        out |= {"model": main_side,
                "targets": {"r_gain_vs_none": MIN_GAIN_NONE, "r_gain_vs_seed": MIN_GAIN_SEED,
                            "max_plain_drop": MAX_PLAIN_DROP},
                "within_target": bool(main_side["r_gain_vs_none"] >= MIN_GAIN_NONE
                                      and main_side["r_gain_vs_seed"] >= MIN_GAIN_SEED
                                      and main_side["plain_change"] >= -MAX_PLAIN_DROP)}
        summary = {k: main_side[k] for k in ("r_gain_vs_none", "r_gain_vs_seed",
                                             "r_literal_gain", "plain_change", "rules")}
        summary["within_target"] = out["within_target"]
    if args.long_caption_prob is not None:
        long_set = [*args.overrides,
                    f"pretrain.short_caption_prob={1 - args.long_caption_prob:g}"]
        side = _side(args.recipe, long_set, args.repo)
        side["picked_long_rule"] = "long" in side["rules"]
        out["long_captions"] = {"long_caption_prob": args.long_caption_prob, **side}
    common.write_json(args.out, out)
    if "long_captions" in out:
        summary["long_captions_rules"] = out["long_captions"]["rules"]
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
