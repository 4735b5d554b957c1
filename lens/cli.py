"""The ``lens`` command line.

    lens run [RECIPE]                      the main job: data -> vae -> pretrain -> rl ->
                                           reasoner -> search -> evaluate -> register ->
                                           promote, on a recipe
    lens data RECIPE [--set k=v] [--json]  the Prefect data flow: validated, DVC-versioned data
    lens data ingest PATH... --out DIR     ingest user data (folders, WebDataset tars, Parquet)
    lens data prepare|validate --params P  the DVC stages (``dvc repro`` runs these)
    lens recipe RECIPE [--set k=v]         print the resolved recipe and its hash
    lens rl prompts [RECIPE | --params P] --out DIR   the RL prompt set (the DVC rl_prompts stage)
    lens model info PRESET [--size WxH]    parameters, FLOPs per forward, training memory
    lens model info RECIPE --plan NODESxGPUS  per-rank memory budget of the recipe
    lens train render RECIPE --target k8s|slurm [--stage pretrain|rl] [--out DIR]
                                           a cluster job for a training stage
    lens generate PROMPT... --model DIR|models:/NAME@ALIAS [--size WxH] [--out DIR]
                                           images from a trained model, one PNG each
    lens promote NAME VERSION [--dry-run]  gate a version and move @champion to it
    lens promote NAME --rollback           move @champion back to the one it replaced
    lens compare A B [--json]              two runs (ids or NAME/VERSION) side by side
    lens search RECIPE --model M           the reasoner's system prompt searched for model M
    lens services up|down|status           the team MLflow + Prefect servers (PostgreSQL, S3,
                                           MLflow auth); settings from the environment
    lens infra render|check|setup|serve|worker  infra files, work pools and limits (lens/infra.py)
    lens ui [--port 5000]                  MLflow's UI on the local store, at the latest run

Exit status: 0 done, 1 the data contract or a promotion gate failed, 2 bad input (the
message says which and how to fix it). With ``--json`` the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from lens_model import defaults
from lens_model.secrets import redact

DATA_COMMANDS = {"ingest", "prepare", "validate"}


def _emit(result: dict[str, Any], as_json: bool, human: str) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True, default=str))
    else:
        print(human)


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=V",
                   help="override a recipe value, e.g. --set data.num_samples=64 (repeatable)")


def _where(result: dict[str, Any]) -> str:
    home, store = defaults.lens_home(), redact(defaults.mlflow_uri())
    return "\n".join([
        f"dataset   {Path(result['manifest']).parent}  (DVC hash {result['dvc_hash']}, "
        f"pushed to {result['dvc_remote']})",
        f"manifest  {result['manifest']}  ({result['valid']} valid)",
        f"quarantine {result['quarantine']}  ({result['quarantined']} rejected: "
        f"{result['reasons'] or 'none'})",
        f"contract  {result['report']}",
        f"mlflow    run {result['mlflow_run_id']} in {store}  "
        f"(UI: mlflow ui --backend-store-uri {store})",
        f"prefect   flow run state under {home / 'prefect'}  "
        f"(UI: PREFECT_HOME={home / 'prefect'} prefect server start)",
        f"cache     {result['shard_tasks_cached']} of {2 * result['shards']} shard tasks reused",
        "seconds   " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()),
    ])


def _scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items())


HACKING = "; REWARD HACKING: the gold score fell while the training reward rose"


def _verdict(promotion: dict[str, Any]) -> str:
    return ("promoted to @champion" if promotion["promoted"] else
            f"not promoted: {promotion.get('reason', 'gates failed')}")


def cmd_run(args: argparse.Namespace) -> int:
    from flows.training_pipeline import run
    from tasks.report import number as _num

    result = run(args.recipe, args.overrides, args.repo)
    keys = ("dvc_hash", "valid", "quarantined", "mlflow_run_id", "manifest", "model_dir",
            "parent_run_id", "pretrain_run_id", "vae_dir", "model", "version", "scores",
            "baseline_scores", "eval_grid", "eval_hash", "seconds_per_image", "pretrained_dir",
            "pretrained_scores", "rl_run_id", "rl_prompts_dvc_hash", "rl", "reasoner_dir",
            "system_prompt_hash", "reasoner", "turbo")
    promotion = result["promotion"]
    out = {k: result[k] for k in keys} | {
        "recipe": result["recipe"], "recipe_hash": result["recipe_hash"],
        "aliases": promotion["aliases"], "promoted": promotion["promoted"],
        "stages": result["stages"], "compute": result["compute"],
        "runs": {k[4:]: v for k, v in result.items() if k.startswith("run.")}}  # stage: run id
    verdict = _verdict(promotion)
    human = _where(result) + "\n" + "\n".join([
        f"vae       {result['vae_dir']}",
        f"pretrained {result['pretrained_dir']}  (pretrain run {result['pretrain_run_id']}, "
        f"job {result['pretrain_job']})",
        f"rl        {result['model_dir']}  (rl run {result['rl_run_id']}; reward "
        f"{_num(result['rl']['reward_start'])} -> {_num(result['rl']['reward_end'])}, gold "
        f"{_num(result['rl']['gold_before'])} -> {_num(result['rl']['gold_after'])}"
        f"{HACKING if result['rl']['reward_hacking'] else ''})",
        f"reasoner  {result['reasoner_dir'] or 'endpoint'}: held-out rule following "
        f"{_num(result['reasoner']['heldout'].get('exact'))}; searched system prompt "
        f"{result['system_prompt_hash']}, shapes-GenEval-R "
        f"{_num(result['reasoner']['test']['r/none']['overall'])} without -> "
        f"{_num(result['reasoner']['test']['r/searched']['overall'])} with it",
        f"scores    {_scores(result['scores'])}  (eval {result['eval_hash']}, "
        f"{result['seconds_per_image']:.3f} s/image)",
        f"before rl {_scores(result['pretrained_scores'])}  (the pretrained model)",
        f"untrained {_scores(result['baseline_scores'])}",
        f"turbo     {_scores(result['turbo']['scores'])}  ({result['turbo']['steps']} steps, no "
        f"CFG, eval {result['turbo']['eval_hash']}, {result['turbo']['seconds_per_image']:.3f} "
        f"s/image, {result['turbo']['speedup']:.1f}x faster; the teacher at these settings: "
        f"{_scores(result['turbo']['undistilled_scores'])})",
        f"grid      {result['eval_grid']}",
        f"registry  {result['model']} v{result['version']} "
        f"@{', @'.join(promotion['aliases']) or '-'}: {verdict}",
        f"registry  {result['turbo']['model']} v{result['turbo']['version']} "
        f"@{', @'.join(result['turbo']['promotion']['aliases']) or '-'}: "
        f"{_verdict(result['turbo']['promotion'])}",
        "stages    " + ", ".join(f"{k} {v:.1f}s" for k, v in result["stages"].items()),
        f"pipeline  MLflow parent run {result['parent_run_id']}"])
    _emit(out, args.json, human)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from flows.reasoner_search import run
    from tasks.report import number as _num

    result = run(args.recipe, args.model, args.overrides)
    test = result["test"]
    human = "\n".join([
        f"system prompt {result['hash']} ({result['rounds']} rounds, stopped by "
        f"{result['stopped']}; search run {result['run_id']}), saved to {result['path']}:",
        *(f"    {line}" for line in result["system_prompt"].splitlines()),
        *(f"{cond:<15} overall {_num(scores['overall'])}" for cond, scores in test.items())])
    _emit(result, args.json, human)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from tasks import promote

    try:
        if args.rollback:
            old, new = promote.rollback(args.name, args.reason)
            _emit({"name": args.name, "from": old, "to": new}, args.json,
                  f"{args.name}: @champion moved back from v{old} to v{new}")
            return 0
        if args.version is None:
            raise ValueError("lens promote needs VERSION (or --rollback)")
        report = promote.check_gates(args.name, args.version)
        if report.passed and not args.dry_run:
            promote.commit(report, reason=args.reason)
    except promote.PromotionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    lines = [f"{'ok  ' if c.passed else 'FAIL'} {c.gate}: {c.value:.4g} (limit {c.limit:.4g})"
             for c in report.checks]
    verb = "would be promoted" if args.dry_run else "promoted to @champion"
    verdict = verb if report.passed else f"fails its gates: {report.failures()}"
    _emit(report.to_json() | {"dry_run": args.dry_run}, args.json,
          "\n".join([*lines, f"{args.name} v{args.version} {verdict}"]))
    return 0 if report.passed else 1


def cmd_compare(args: argparse.Namespace) -> int:
    from lens_model.eval.geneval import EvalProtocol
    from lens_model.recipe import load_recipe
    from tasks import compare

    result = compare.compare(args.a, args.b)
    if args.recipe:
        protocol = EvalProtocol.from_recipe(load_recipe(args.recipe).eval)
    elif result["protocol"]:
        protocol = EvalProtocol(**result["protocol"])
    else:
        raise SystemExit(f"{args.a} has no evaluation run to take the grid's protocol from; "
                         f"pass --recipe NAME to draw it under that recipe's protocol")
    sides = {args.a: result["a"]["model"], args.b: result["b"]["model"]}
    grid = compare.side_by_side_grid(sides, protocol, Path(args.out))
    result["grid"] = str(grid)
    width = 44

    def row(key: str, pair: list[Any]) -> str:
        a, b = (f"{v:.4g}" if isinstance(v, float) else str(v) for v in pair)
        return f"  {key[:width]:<{width}} {a[:30]:<30} {b[:30]}"

    lines = [f"  {'':<{width}} {'A: ' + args.a:<30} B: {args.b}"]
    for title in ("params_differ", "lineage", "scores", "baseline", "compute", "reasoner"):
        lines.append(title.replace("_", " "))
        lines += [row(k, v) for k, v in result[title].items()] or ["  (none)"]
    prompts = result["system_prompt"]
    lines.append(f"system prompt {prompts['hashes'][0]} -> {prompts['hashes'][1]}")
    lines += [f"  {line}" for line in prompts["diff"]] or ["  (the same)"]
    lines.append(f"grid {grid} (A above B, same prompts and seeds; "
                 f"legend {grid.with_suffix('.txt')})")
    _emit(result, args.json, "\n".join(lines))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from lens import ui

    return ui.serve(args.host, args.port)


def cmd_services(args: argparse.Namespace) -> int:
    from lens import services

    settings = services.ServiceSettings.from_env()
    chosen = tuple(args.only or services.SERVICES)
    try:
        if args.action == "up":
            took = services.up(settings, chosen, timeout=args.timeout)
            for name in chosen:
                how = f"started in {took[name]:.1f} s" if took[name] else "already running"
                print(f"{name} {how}; log {settings.log_file(name)}", file=sys.stderr)
                print(f"{name}: {services.service_url(settings, name)}")
            return 0
        if args.action == "down":
            stopped = services.down(settings, chosen)
            for name in chosen:
                print(f"{name}: {'stopped' if name in stopped else 'was not running'}")
            return 0
    except services.ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = {name: st for name, st in services.status(settings).items() if name in chosen}
    lines = [f"{name}: {st['url']} " + (f"running (pid {st['pid']}, "
             f"{'healthy' if st['healthy'] else 'NOT healthy'})" if st["running"] else "stopped")
             + f"; log {st['log']}" for name, st in report.items()]
    _emit(report, args.json, "\n".join(lines))
    return 0 if all(st["healthy"] for st in report.values()) else 1  # 1: not all up


def cmd_data_flow(args: argparse.Namespace) -> int:
    from flows.data import run

    result = run(args.recipe, args.overrides, args.repo)
    keys = ("dvc_hash", "valid", "quarantined", "mlflow_run_id", "manifest")
    out = {k: result[k] for k in keys} | {"recipe": result["recipe"],
                                          "recipe_hash": result["recipe_hash"]}
    _emit(out, args.json, _where(result))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from lens_model.recipe import load_recipe
    from tasks import dataset

    paths = [str(Path(p).resolve()) for p in args.paths]
    recipe = load_recipe(args.recipe, [*args.overrides, "data.source=ingest",
                                       f"data.ingest_paths={json.dumps(paths)}"])
    out = Path(args.out).resolve()
    dataset.prepare_all(recipe, out / "shards")
    merged = dataset.validate_all(recipe, out / "shards", out)
    result = {k: merged[k] for k in ("inputs", "valid", "quarantined", "reasons", "manifest",
                                     "quarantine")} | {"passed": merged["passed"]}
    verdict = "passed" if merged["passed"] else "FAILED: " + "; ".join(merged["why"])
    _emit(result, args.json, f"{merged['inputs']} inputs -> {merged['valid']} valid + "
          f"{merged['quarantined']} quarantined {merged['reasons']}\ncontract {verdict}\n"
          f"manifest {merged['manifest']}\nquarantine {merged['quarantine']}\n"
          f"report {merged['summary']}")
    return 0 if merged["passed"] else 1


def cmd_prepare(args: argparse.Namespace) -> int:
    from lens_model.recipe import load_recipe
    from tasks import dataset

    prepared = dataset.prepare_all(load_recipe(args.params), Path(args.raw))
    print(f"prepared {len(prepared)} shard(s), {sum(p['inputs'] for p in prepared)} inputs "
          f"in {args.raw}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from lens_model.recipe import load_recipe
    from tasks import dataset

    merged = dataset.validate_all(load_recipe(args.params), Path(args.raw), Path(args.out))
    print(Path(merged["summary"]).read_text())
    return 0 if merged["passed"] else 1


def cmd_recipe(args: argparse.Namespace) -> int:
    from lens_model.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    tree = recipe.model_dump(mode="json") | {"hash": recipe.hash()}
    _emit(tree, args.json, json.dumps(tree, indent=2))
    return 0


def cmd_rl_prompts(args: argparse.Namespace) -> int:
    from lens_model.recipe import load_recipe
    from lens_model.rl.llm import LLMError
    from tasks.rl_prompts import build_and_check

    recipe = load_recipe(args.recipe, args.overrides) if args.recipe else load_recipe(args.params)
    try:
        built = build_and_check(recipe, Path(args.out))
    except LLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = built["counts"]
    _emit(built, args.json, f"{counts['total']} prompts: {counts['train']} train "
          f"({counts['items.train']} items), {counts['gold']} gold ({counts['items.gold']} "
          f"items)\n" + "\n".join(f"  {k}: {v}" for k, v in counts.items() if "." in k
                                  and not k.startswith("items.")) + f"\nwrote {built['path']}")
    return 0


def cmd_model_plan(args: argparse.Namespace) -> int:
    from lens_model.memory_plan import plan
    from lens_model.recipe import load_recipe, parse_pair

    nodes, gpus = parse_pair(args.plan, "--plan", "NODESxGPUS, e.g. 16x8")
    capacity = None if args.gpu_gib is None else int(args.gpu_gib * 2**30)
    out = plan(load_recipe(args.preset, args.overrides), nodes, gpus, args.encoder_params,
               capacity)
    gib = {k: v / 2**30 for k, v in out["bytes"].items()}
    verdict = "fits" if out["margin"] >= 0 else "does NOT fit"
    human = "\n".join([
        f"{out['recipe']} on {nodes}x{gpus} ({out['precision']}, ZeRO-{out['zero_stage']}, "
        f"checkpointing {'on' if out['grad_checkpointing'] else 'off'}, features "
        f"{out['features']}), per rank:",
        *(f"  {k:13s} {v:7.2f} GiB" for k, v in gib.items()),
        f"  {'total':13s} {out['total'] / 2**30:7.2f} GiB of {out['capacity'] / 2**30:.0f} GiB: "
        f"{verdict}, margin {out['margin'] / 2**30:.2f} GiB",
        f"micro-batch (worst case): {out['micro_batch']['image']} image and "
        f"{out['micro_batch']['text']} text tokens, {out['micro_batch']['samples']} samples",
    ])
    _emit(out, args.json, human)
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from lens_model.flops import info
    from lens_model.recipe import parse_pair

    if args.plan:
        return cmd_model_plan(args)

    width, height = parse_pair(args.size, "--size", "WIDTHxHEIGHT, e.g. 1024x1024")
    out = info(args.preset, width, height, args.text_tokens, args.token_px)
    mem = out["memory_bytes"]
    human = "\n".join([
        f"{out['preset']}: {out['params']:,} parameters ({out['params_without_adaln']:,} "
        f"without adaLN)",
        f"forward at {out['resolution']} ({out['image_tokens']} image + {out['text_tokens']} "
        f"text tokens): {out['forward_flops']:.4g} FLOPs; train step {out['train_step_flops']:.4g}"
        f" ({out['train_step_flops_checkpointed']:.4g} with activation checkpointing)",
        "training memory: " + ", ".join(f"{k} {mem[k] / 2**30:.2f} GiB"
                                        for k in ("weights", "grads", "adam", "total")),
    ])
    _emit(out, args.json, human)
    return 0


def cmd_train_render(args: argparse.Namespace) -> int:
    from lens_model import atomic
    from lens_model.recipe import load_recipe
    from lens_model.train.launch import render_job

    recipe = load_recipe(args.recipe, args.overrides)
    name, run, text = render_job(recipe, args.stage, args.target, mount=args.mount,
                                 pvc=args.pvc, dataset=args.dataset, vae=args.vae,
                                 model=args.model, prompts=args.prompts)
    if args.out:
        out = Path(args.out)  # atomic writes create it
        suffix = "yaml" if args.target == "k8s" else "sbatch"
        atomic.write_text(out / f"{name}.{suffix}", text)
        atomic.write_text(out / "recipe.yaml", recipe.to_yaml())
        print(f"wrote {out / f'{name}.{suffix}'} and {out / 'recipe.yaml'}; copy the recipe "
              f"to {run}/recipe.yaml on the shared volume before submitting")
    else:
        print(text)
    return 0


def _slug(prompt: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower())[:limit].strip("-") or "image"


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from lens_model import atomic
    from lens_model.pipeline import check_aspect, load_pipeline, parse_size
    from tasks.registry import local_model

    if args.size:  # a bad size fails here, before a model is loaded
        check_aspect(*parse_size(args.size))
    if (args.steps is not None and args.steps < 1) or args.batch < 1:
        raise ValueError(f"--steps {args.steps} and --batch {args.batch} must both be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")]
    pipe = load_pipeline(local_model(args.model), dtype=dtype).to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths, flags, drawn = [], {}, []
    # per-image seeds (seed + index): chunking into batches does not change any image
    for start in range(0, len(args.prompts), args.batch):
        chunk = args.prompts[start:start + args.batch]
        result = pipe(chunk, size=args.size, num_inference_steps=args.steps,
                      guidance_scale=args.cfg, negative_prompt=args.negative,
                      seed=args.seed + start, sampler=args.sampler, reasoner=args.reasoner)
        flags.update(result.flags)
        drawn += result.prompts
        for i, (prompt, image) in enumerate(zip(chunk, result.images, strict=True), start):
            path = out / f"{i:02d}-{_slug(prompt)}.png"
            atomic.write_with(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
            paths.append(str(path))
    for flag in flags.values():
        print(f"warning: {flag}", file=sys.stderr)
    rewrites = drawn if pipe.rewriter is not None and args.reasoner is not False else None
    if rewrites is not None and not args.json:
        for prompt, text in zip(args.prompts, rewrites, strict=True):
            print(f"reasoner ({pipe.rewriter.hash}): {prompt!r} -> {text!r}", file=sys.stderr)
    _emit({"images": paths, "flags": flags, "model": args.model, "seed": args.seed,
           "rewrites": rewrites}, args.json, "\n".join(paths))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lens", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the pipeline on a recipe (default: tiny)")
    run.add_argument("recipe", nargs="?", default="tiny")
    run.add_argument("--repo", help="the DVC repo (default: $LENS_DVC_REPO or the cwd)")
    run.add_argument("--json", action="store_true")
    _overrides(run)
    run.set_defaults(func=cmd_run)

    data = sub.add_parser("data", help="data flow, ingest and the DVC data stages")
    dsub = data.add_subparsers(dest="data_command", required=True)
    flow = dsub.add_parser("flow", help="run the data flow: lens data RECIPE")
    flow.add_argument("recipe")
    flow.add_argument("--repo", help="the DVC repo (default: $LENS_DVC_REPO or the cwd)")
    flow.add_argument("--json", action="store_true")
    _overrides(flow)
    flow.set_defaults(func=cmd_data_flow)

    ingest = dsub.add_parser("ingest", help="ingest folders, WebDataset tars or Parquet")
    ingest.add_argument("paths", nargs="+")
    ingest.add_argument("--out", required=True)
    ingest.add_argument("--recipe", default="lens-3.8b",
                        help="whose data.contract thresholds apply (default: lens-3.8b)")
    ingest.add_argument("--json", action="store_true")
    _overrides(ingest)
    ingest.set_defaults(func=cmd_ingest)

    for name, func in (("prepare", cmd_prepare), ("validate", cmd_validate)):
        stage = dsub.add_parser(name, help=f"the DVC {name} stage")
        stage.add_argument("--params", default="params.yaml")
        stage.add_argument("--raw", default="data/raw")
        stage.add_argument("--out", default="data/dataset")
        stage.set_defaults(func=func)

    model = sub.add_parser("model", help="the backbone presets")
    msub = model.add_subparsers(dest="model_command", required=True)
    minfo = msub.add_parser("info", help="parameters, FLOPs per forward, training memory")
    minfo.add_argument("preset", help="tiny | toy | lens-3.8b")
    minfo.add_argument("--size", default="1024x1024", help="image WIDTHxHEIGHT")
    minfo.add_argument("--text-tokens", type=int, default=256)
    minfo.add_argument("--token-px", type=int, default=16, help="VAE factor x patch size")
    minfo.add_argument("--json", action="store_true")
    minfo.add_argument("--plan", metavar="NODESxGPUS",
                       help="per-rank memory of the recipe of this name on NODES x GPUS")
    _overrides(minfo)
    minfo.add_argument("--encoder-params", type=int, default=None,
                       help="with --plan: the text encoder's parameters, where "
                       "text_encoder.path is not a local folder")
    minfo.add_argument("--gpu-gib", type=float, default=None,
                       help="with --plan: GPU memory in GiB (default: launch.gpu_type's)")
    minfo.set_defaults(func=cmd_model_info)

    train = sub.add_parser("train", help="training launch helpers")
    tsub = train.add_subparsers(dest="train_command", required=True)
    rend = tsub.add_parser("render", help="a Kubernetes PyTorchJob or Slurm sbatch script")
    rend.add_argument("recipe")
    rend.add_argument("--stage", default="pretrain", choices=["pretrain", "rl", "distill"],
                      help="the training program the job runs")
    rend.add_argument("--target", required=True, choices=["k8s", "slurm"])
    rend.add_argument("--out", help="folder for the job file and the resolved recipe")
    rend.add_argument("--mount", default="/workspace/runs", help="shared volume for runs")
    rend.add_argument("--pvc", default="lens-runs", help="k8s: the claim mounted at --mount")
    rend.add_argument("--dataset", default="data/dataset", help="dataset path on the nodes")
    rend.add_argument("--vae", help="VAE folder on the nodes (default: the recipe's vae.path)")
    rend.add_argument("--model", help="rl: the pretrained final/ on the nodes (default: the "
                      "pretrain job's, under --mount); distill: the teacher (default: the rl "
                      "job's)")
    rend.add_argument("--prompts", default="data/rl_prompts/prompts.parquet",
                      help="rl: the RL prompt set on the nodes")
    _overrides(rend)
    rend.set_defaults(func=cmd_train_render)

    gen = sub.add_parser("generate", help="images from a trained model, one PNG per prompt")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--model", required=True, help="a saved LensPipeline folder, a training "
                     "run's final/ folder, or an MLflow URI models:/NAME@ALIAS | NAME/VERSION")
    gen.add_argument("--size", help="WIDTHxHEIGHT in pixels (default: the largest trained area)")
    gen.add_argument("--steps", type=int, help="sampling steps (default: 20, or the steps a "
                     "distilled model was distilled for)")
    gen.add_argument("--cfg", type=float, help="guidance scale; <= 1 turns CFG off (default: "
                     "5.0, or 1.0 for a distilled model)")
    gen.add_argument("--negative", default="", help="negative prompt (default: none)")
    gen.add_argument("--seed", type=int, default=0, help="image i gets seed + i")
    gen.add_argument("--sampler", choices=["euler", "heun"], default="euler")
    gen.add_argument("--out", default="generated", help="folder for the PNGs")
    gen.add_argument("--batch", type=int, default=4, help="prompts per forward batch")
    gen.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    gen.add_argument("--dtype", choices=["float32", "bfloat16"],
                     help="weights dtype (default: bfloat16 on cuda, float32 on cpu)")
    gen.add_argument("--reasoner", action=argparse.BooleanOptionalAction, default=None,
                     help="rewrite the prompts with the reasoner saved with the model first "
                     "(default: when it has one); the rewrites are printed")
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(func=cmd_generate)

    srch = sub.add_parser("search", help="search the reasoner's system prompt for one model")
    srch.add_argument("recipe", help="the recipe whose reasoner and search settings to use")
    srch.add_argument("--model", required=True, help="a saved LensPipeline folder, a training "
                      "run's final/ folder, or models:/NAME@ALIAS | NAME/VERSION")
    srch.add_argument("--json", action="store_true")
    _overrides(srch)
    srch.set_defaults(func=cmd_search)

    prom = sub.add_parser("promote", help="gate a model version and move @champion to it")
    prom.add_argument("name", help="registered model name")
    prom.add_argument("version", nargs="?", help="the version to promote")
    prom.add_argument("--dry-run", action="store_true", help="check the gates, move nothing")
    prom.add_argument("--rollback", action="store_true",
                      help="move @champion back to the champion it replaced")
    prom.add_argument("--reason", default="", help="recorded on the version")
    prom.add_argument("--json", action="store_true")
    prom.set_defaults(func=cmd_promote)

    comp = sub.add_parser("compare", help="two runs side by side: params, lineage, scores, "
                          "compute, and one image grid")
    comp.add_argument("a", help="a pipeline or stage run id, or NAME/VERSION")
    comp.add_argument("b", help="the same for the other side")
    comp.add_argument("--recipe", default=None, help="whose eval protocol draws the grid "
                      "(default: the one side A was evaluated under)")
    comp.add_argument("--out", default="compare/grid.png", help="where the grid goes")
    comp.add_argument("--json", action="store_true")
    comp.set_defaults(func=cmd_compare)

    ui_p = sub.add_parser("ui", help="MLflow's UI on the local store; prints the latest "
                          "pipeline run's URL")
    ui_p.add_argument("--host", default="127.0.0.1", help="interface to listen on (loopback: "
                      "the local store has no authentication)")
    ui_p.add_argument("--port", type=int, default=5000)
    ui_p.set_defaults(func=cmd_ui)

    svc = sub.add_parser("services", help="the team MLflow + Prefect servers: up, down, status "
                         "(settings: lens/services.py ENV_VARS)")
    svc.add_argument("action", choices=["up", "down", "status"])
    svc.add_argument("--only", action="append", choices=["mlflow", "prefect"],
                     help="act on this service only (repeatable; default: both)")
    svc.add_argument("--timeout", type=float, default=180.0,
                     help="up: seconds to wait for each server to be healthy")
    svc.add_argument("--json", action="store_true", help="status: one JSON object")
    svc.set_defaults(func=cmd_services)

    # Listed for --help; main() hands `lens infra ...` to lens.infra's own parser.
    sub.add_parser("infra", help="infra files from the settings, work pools, concurrency "
                   "limits, servers in the foreground (lens infra --help)", add_help=False)

    recipe = sub.add_parser("recipe", help="print a resolved recipe and its hash")
    recipe.add_argument("recipe")
    recipe.add_argument("--json", action="store_true")
    _overrides(recipe)
    recipe.set_defaults(func=cmd_recipe)

    rl = sub.add_parser("rl", help="RL post-training helpers")
    rlsub = rl.add_subparsers(dest="rl_command", required=True)
    rlp = rlsub.add_parser("prompts", help="build the RL prompt set (the DVC rl_prompts stage)")
    rlp.add_argument("recipe", nargs="?", help="a recipe (default: the one in --params)")
    rlp.add_argument("--params", default="params.yaml", help="a resolved recipe (params.yaml)")
    rlp.add_argument("--out", default="data/rl_prompts")
    rlp.add_argument("--json", action="store_true")
    _overrides(rlp)
    rlp.set_defaults(func=cmd_rl_prompts)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "data" and argv[1] not in DATA_COMMANDS | {"-h", "--help"}:
        argv.insert(1, "flow")  # `lens data RECIPE` is the flow
    if argv[:1] == ["infra"]:  # its own parser, options included (`lens infra check --help`)
        from lens import infra

        return infra.main(argv[1:])
    args = parser().parse_args(argv)
    defaults.apply()
    from lens_model.recipe import RecipeError
    from tasks.dataset import ContractFailed
    from tasks.dvc_ops import DvcError

    try:
        return args.func(args)
    except (RecipeError, DvcError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ContractFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
