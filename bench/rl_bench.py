"""RL's effect on shapes-GenEval: the pretrained model before, the RL model after, one run.

    python -m bench.rl_bench [--recipe small] [--set section.key=value ...] \\
        [--out bench/results/rl_bench.json]

It runs the recipe's pipeline (data -> vae -> pretrain -> rl -> evaluate -> ...): a pretrained
model that exists (the same pretrain job finished before) is reused, not retrained. Scores are
on shapes-GenEval's held-out prompts (the RL prompt set excludes every one of them, which the
bench checks): the pretrained and the RL model under the recipe's protocol, and both without
CFG too (RL's rollouts are drawn without it). It also reports the gold
set's reward before and after, the per-category changes, the RL stage's wall time and the
fidelity target: overall +0.10, no category down by more than 0.04, within 45 minutes of RL.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from bench import common

TARGET_GAIN, MAX_DROP, MAX_RL_S = 0.10, 0.04, 45 * 60


def main(argv: list[str] | None = None) -> int:
    args = common.parser("rl_bench", __doc__).parse_args(argv)
    recipe = common.load(args.recipe, args.overrides)  # first: it sets the env these read
    from lens_model.eval.geneval import EvalProtocol, evaluate, pipeline_generator
    from lens_model.pipeline import load_pipeline
    from lens_model.rl.prompts import read_prompts

    result, pipeline_s = common.run_pipeline(args.recipe, args.overrides, args.repo)
    protocol = EvalProtocol.from_recipe(recipe.eval)
    no_cfg = replace(protocol, cfg=0.0)
    before_no_cfg, after_no_cfg = (
        evaluate(pipeline_generator(load_pipeline(model), no_cfg), no_cfg).scores
        for model in (result["pretrained_dir"], result["model_dir"]))
    before, after = result["pretrained_scores"], result["scores"]
    rl_prompts = {p.text for p in read_prompts(Path(result["rl_prompts_path"]))}
    leaked = sorted(rl_prompts & {p.text for p in protocol.prompts()})
    gain = after["overall"] - before["overall"]
    drops = {k: before[k] - after[k] for k in before if k != "overall"}
    rl_s = result["stages"]["rl"]
    out = {**common.header("rl_bench", args, recipe),
           "eval_hash": {"pretrained": protocol.hash(), "no_cfg": no_cfg.hash()},
           "pretrained": before, "rl": after, "pretrained_no_cfg": before_no_cfg,
           "rl_no_cfg": after_no_cfg, "gain_overall": gain,
           "gain_overall_no_cfg": after_no_cfg["overall"] - before_no_cfg["overall"],
           "category_drop": drops,
           "gold_before": result["rl"]["gold_before"], "gold_after": result["rl"]["gold_after"],
           "reward_hacking": result["rl"]["reward_hacking"], "rl_stage_s": rl_s,
           "stages_s": result["stages"], "pipeline_s": pipeline_s,
           "eval_prompts_in_rl_set": leaked, "rl_run_id": result["rl_run_id"],
           "targets": {"gain_overall": TARGET_GAIN, "max_category_drop": MAX_DROP,
                       "max_rl_s": MAX_RL_S},
           "within_target": bool(gain >= TARGET_GAIN and max(drops.values()) <= MAX_DROP
                                 and rl_s <= MAX_RL_S and not leaked)}
    common.write_json(args.out, out)
    print(json.dumps({k: out[k] for k in ("pretrained", "rl", "gain_overall", "gold_before",
                                          "gold_after", "rl_stage_s", "within_target")},
                     default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
