"""The ``lens`` command line.

    lens run [RECIPE]                      the main job: data -> vae -> pretrain on a recipe
    lens data RECIPE [--set k=v] [--json]  the Prefect data flow: validated, DVC-versioned data
    lens data ingest PATH... --out DIR     ingest user data (folders, WebDataset tars, Parquet)
    lens data prepare|validate --params P  the DVC stages (``dvc repro`` runs these)
    lens recipe RECIPE [--set k=v]         print the resolved recipe and its hash
    lens model info PRESET [--size WxH]    parameters, FLOPs per forward, training memory
    lens train render RECIPE --target k8s|slurm [--out DIR]   a cluster job for pretraining

Exit status: 0 done, 1 the data contract failed, 2 bad input (the message says which and
how to fix it). With ``--json`` the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lens import defaults

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
    home = defaults.lens_home()
    return "\n".join([
        f"dataset   {Path(result['manifest']).parent}  (DVC hash {result['dvc_hash']}, "
        f"pushed to {result['dvc_remote']})",
        f"manifest  {result['manifest']}  ({result['valid']} valid)",
        f"quarantine {result['quarantine']}  ({result['quarantined']} rejected: "
        f"{result['reasons'] or 'none'})",
        f"contract  {result['report']}",
        f"mlflow    run {result['mlflow_run_id']} in {defaults.mlflow_uri()}  "
        f"(UI: mlflow ui --backend-store-uri {defaults.mlflow_uri()})",
        f"prefect   flow run state under {home / 'prefect'}  "
        f"(UI: PREFECT_HOME={home / 'prefect'} prefect server start)",
        f"cache     {result['shard_tasks_cached']} of {2 * result['shards']} shard tasks reused",
        "seconds   " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()),
    ])


def cmd_run(args: argparse.Namespace) -> int:
    from flows.pipeline import run

    result = run(args.recipe, args.overrides, args.repo)
    keys = ("dvc_hash", "valid", "quarantined", "mlflow_run_id", "manifest", "model_dir",
            "parent_run_id", "pretrain_run_id", "vae_dir")
    out = {k: result[k] for k in keys} | {"recipe": result["recipe"],
                                          "recipe_hash": result["recipe_hash"]}
    human = _where(result) + "\n" + "\n".join([
        f"vae       {result['vae_dir']}",
        f"model     {result['model_dir']}  (pretrain run {result['pretrain_run_id']}, "
        f"job {result['pretrain_job']})",
        f"pipeline  MLflow parent run {result['parent_run_id']}"])
    _emit(out, args.json, human)
    return 0


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
    from tasks import dataset, dvc_ops

    prepared = dataset.prepare_all(dvc_ops.read_params(args.params), Path(args.raw))
    print(f"prepared {len(prepared)} shard(s), {sum(p['inputs'] for p in prepared)} inputs "
          f"in {args.raw}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from tasks import dataset, dvc_ops

    merged = dataset.validate_all(dvc_ops.read_params(args.params), Path(args.raw), Path(args.out))
    print(Path(merged["summary"]).read_text())
    return 0 if merged["passed"] else 1


def cmd_recipe(args: argparse.Namespace) -> int:
    from lens_model.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    tree = recipe.model_dump(mode="json") | {"hash": recipe.hash()}
    _emit(tree, args.json, json.dumps(tree, indent=2))
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from lens_model.flops import info

    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {args.size!r}: expected WIDTHxHEIGHT, e.g. 1024x1024") from None
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
    import yaml

    from lens_model.recipe import load_recipe
    from lens_model.train.launch import render

    recipe = load_recipe(args.recipe, args.overrides)
    name = f"pretrain-{recipe.name.replace('.', '-')}-{recipe.hash()}"
    run = f"{args.mount}/{name}"
    vae = args.vae or recipe.vae.path or f"{run}/vae"
    launch = recipe.launch
    params = {"name": name, "nnodes": launch.nnodes, "nproc_per_node": launch.nproc_per_node,
              "master_port": launch.master_port, "script": "lens_model/train/pretrain.py",
              "args": ["--params", f"{run}/recipe.yaml", "--dataset", args.dataset,
                       "--vae", vae, "--run", run]}
    if args.target == "k8s":
        params |= {"image": launch.image, "mount_path": args.mount, "pvc": args.pvc}
    text = render(args.target, **params)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        suffix = "yaml" if args.target == "k8s" else "sbatch"
        (out / f"{name}.{suffix}").write_text(text)
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"),
                                                        sort_keys=False))
        print(f"wrote {out / f'{name}.{suffix}'} and {out / 'recipe.yaml'}; copy the recipe "
              f"to {run}/recipe.yaml on the shared volume before submitting")
    else:
        print(text)
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
    minfo.set_defaults(func=cmd_model_info)

    train = sub.add_parser("train", help="pretraining launch helpers")
    tsub = train.add_subparsers(dest="train_command", required=True)
    rend = tsub.add_parser("render", help="a Kubernetes PyTorchJob or Slurm sbatch script")
    rend.add_argument("recipe")
    rend.add_argument("--target", required=True, choices=["k8s", "slurm"])
    rend.add_argument("--out", help="folder for the job file and the resolved recipe")
    rend.add_argument("--mount", default="/workspace/runs", help="shared volume for runs")
    rend.add_argument("--pvc", default="lens-runs", help="k8s: the claim mounted at --mount")
    rend.add_argument("--dataset", default="data/dataset", help="dataset path on the nodes")
    rend.add_argument("--vae", help="VAE folder on the nodes (default: the recipe's vae.path)")
    _overrides(rend)
    rend.set_defaults(func=cmd_train_render)

    recipe = sub.add_parser("recipe", help="print a resolved recipe and its hash")
    recipe.add_argument("recipe")
    recipe.add_argument("--json", action="store_true")
    _overrides(recipe)
    recipe.set_defaults(func=cmd_recipe)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "data" and argv[1] not in DATA_COMMANDS | {"-h", "--help"}:
        argv.insert(1, "flow")  # `lens data RECIPE` is the flow
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
