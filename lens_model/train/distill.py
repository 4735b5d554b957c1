"""Lens-Turbo: the teacher distilled into a 4-step, CFG-free student, through the DeepSpeed
trainer. The same program runs the tiny recipe on one CPU and the paper's recipe on GPU nodes::

    python lens_model/train/distill.py --params RUN/recipe.yaml --model RL/final \\
        --dataset DATA --features FEATURES --run-dir RUN
    python -m torch.distributed.run --nproc_per_node 8 lens_model/train/distill.py ...

The student and the fake score start as copies of the teacher (``--model``, frozen); the
student is the trainer's main engine and the critic (fake score + discriminator head) a
companion engine, both AdamW with betas (0, 0.9), checkpointed and resumed together with the
RNG streams and the batch source's position. After each student update the fake score moves
toward the student (IDA). Rank 0 appends events to ``RUN/events.jsonl`` (every loss term, the
compute ledger, the student's 4-step grid under the teacher's 20-step CFG grid) and saves the
student in ``RUN/final``, its ``lens.json`` holding the fixed schedule it draws with.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor

from lens_model import atomic
from lens_model.data.loader import read_manifest
from lens_model.denoiser import LensDenoiser, sample_latents
from lens_model.distill.losses import Discriminator, ida_update
from lens_model.distill.step import Critic, DistillBatch, DistillStep
from lens_model.features import FeatureCache, Features
from lens_model.flops import forward_flops, train_step_flops
from lens_model.flow_matching import euler_sigmas, flow_sample, shift_mu
from lens_model.pipeline import parse_size
from lens_model.recipe import Recipe
from lens_model.train.checkpoint import latest
from lens_model.train.engine import StepCounted, TrainConfig, Trainer
from lens_model.train.ledger import ComputeLedger
from lens_model.train.pretrain import (
    GRID_SEED,
    Events,
    _rank_world,
    build_feature_cache,
    feature_shards,
    grid_prompts,
    save_final,
    start_program,
)
from lens_model.train.rl import image_grid, load_parts, to_images


def student_sigmas(recipe: Recipe, patch: int, downsample: int) -> Tensor:
    """The student's fixed noise levels (N,): the recipe's, or the teacher's Euler schedule
    at the evaluation size (its resolution shift included), fixed from here on."""
    d = recipe.distill
    if d.sigmas:
        return torch.tensor(d.sigmas, dtype=torch.float32)
    width, height = parse_size(recipe.eval.size)
    tokens = (height // downsample // patch) * (width // downsample // patch)
    return euler_sigmas(d.student_steps, shift_mu(tokens, **recipe.pretrain.mu_rule()))[:-1]


def balanced_subset(buckets: dict[str, str], size: int, seed: int) -> dict[str, list[str]]:
    """Up to ``size`` keys dealt evenly over the buckets (key -> bucket name), each bucket's
    keys in a seeded order: bucket -> its keys."""
    by_bucket: dict[str, list[str]] = {}
    for key, name in sorted(buckets.items()):
        by_bucket.setdefault(name, []).append(key)
    for name, keys in by_bucket.items():
        random.Random(f"distill-subset/{seed}/{name}").shuffle(keys)
    out: dict[str, list[str]] = {name: [] for name in by_bucket}
    taken, depth = 0, 0
    while taken < size and any(depth < len(k) for k in by_bucket.values()):
        for name in sorted(by_bucket):
            if taken < size and depth < len(by_bucket[name]):
                out[name].append(by_bucket[name][depth])
                taken += 1
        depth += 1
    return {name: keys for name, keys in out.items() if keys}


class BalancedBatches(StepCounted):
    """Each step, ``batch`` samples of one bucket (buckets drawn uniformly: balanced, and one
    size per batch) from the subset. What a step draws follows from (seed, step, rank), so a
    resumed run draws what the straight run drew; the state is the step count."""

    def __init__(self, subset: dict[str, list[str]], features: dict[str, Features],
                 batch: int, short_prob: float, seed: int, rank: int) -> None:
        if not subset:
            raise ValueError("the distillation subset is empty: the dataset has no rows in the "
                             "feature cache; rebuild the dataset or raise distill.num_samples")
        self.subset, self.features, self.batch = subset, features, batch
        self.short_prob, self.seed, self.rank = short_prob, seed, rank
        self.step = 0

    def __iter__(self) -> Iterator[DistillBatch]:
        while True:
            rng = random.Random(f"distill/{self.seed}/{self.step}/{self.rank}")
            keys = self.subset[rng.choice(sorted(self.subset))]
            picks = rng.choices(keys, k=self.batch)
            texts = []
            for key in picks:
                text, mask, _, short = self.features[key]
                use_short = short is not None and rng.random() < self.short_prob
                texts.append(short if use_short else text[:int(mask.sum())])
            self.step += 1
            yield DistillBatch(torch.stack([self.features[k][2] for k in picks]).float(),
                               [t.float() for t in texts])


@torch.no_grad()
def turbo_grid(student: LensDenoiser, teacher: LensDenoiser, encoder: Any, vae: Any,
               recipe: Recipe, sigmas: Tensor) -> Image.Image:
    """The teacher's samples under its evaluation protocol (steps, CFG) on top, the student's
    on the fixed schedule without CFG below: the same prompts and noise."""
    prompts = [p for p, _ in grid_prompts(recipe)]
    width, height = parse_size(recipe.eval.size)
    f, c = vae.downsample, vae.latent_channels
    shape = (len(prompts), c, height // f, width // f)
    cond, uncond = encoder.hidden(prompts), encoder.hidden([""] * len(prompts))
    device = next(student.parameters()).device
    teacher_z = sample_latents(teacher, cond, uncond, shape, recipe.eval.steps, recipe.eval.cfg,
                               torch.Generator().manual_seed(GRID_SEED), recipe.pretrain.mu_rule())
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(GRID_SEED)).to(device)
    states, mask = cond[0].to(device), cond[1].to(device)
    schedule = torch.cat([sigmas, sigmas.new_zeros(1)])
    student_z = flow_sample(lambda x, t: student.velocity(x, states, mask, t).float(), noise,
                            schedule)
    top = image_grid(to_images(vae, [z.float().cpu() for z in teacher_z]), scale=1)
    bottom = image_grid(to_images(vae, [z.float().cpu() for z in student_z]), scale=1)
    grid = Image.new("RGB", (top.width, top.height * 2), "white")
    grid.paste(top, (0, 0))
    grid.paste(bottom, (0, top.height))
    return grid


def train_distill(recipe: Recipe, run: Path, teacher: LensDenoiser, encoder: Any, vae: Any,
                  features: dict[str, Features], buckets: dict[str, str], vae_dir: str,
                  source: str) -> Path | None:
    """Distil ``teacher`` (from ``source``) on the balanced subset of ``features``; logs to
    ``run``, saves ``run/final`` on rank 0 and returns it (None on other ranks)."""
    d = recipe.distill
    run.mkdir(parents=True, exist_ok=True)
    cfg = teacher.transformer.transformer_config
    teacher.requires_grad_(False).eval()
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    sigmas = student_sigmas(recipe, cfg.patch_size, vae.downsample)
    holder: dict[str, Any] = {}
    loss_fn = DistillStep(d, teacher, sigmas, lambda: holder["critic"])
    config = TrainConfig(lr=d.lr, betas=tuple(d.betas), grad_clip=d.grad_clip,
                         zero_stage=d.zero_stage, precision=d.precision, ema_decay=None,
                         ckpt_every=d.ckpt_every, keep_last=d.keep_last,
                         ckpt_dir=run / "checkpoints", seed=recipe.seed)
    trainer = Trainer(student, loss_fn, config)
    critic = Critic(copy.deepcopy(student), Discriminator(cfg.width))
    holder["critic"] = trainer.add_companion(
        "critic", critic, config, [{"params": list(critic.fake.parameters())},
                                   {"params": list(critic.disc.parameters()), "lr": d.disc_lr}])
    teacher.to(trainer.device)
    vae.to(trainer.device)
    batches = BalancedBatches(balanced_subset(buckets, d.num_samples, recipe.seed), features,
                              d.batch, recipe.pretrain.short_caption_prob, recipe.seed,
                              trainer.rank)
    events = Events(run, trainer.rank)
    device = torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu"
    ledger = ComputeLedger(device, trainer.world_size)
    trainer.stateful["ledger"] = ledger
    trainer.restore(batches)
    events.emit(step=trainer.step, metrics={"compute/deepspeed_init_s": trainer.init_s},
                resumed_from=str(trainer.resumed_from or ""),
                sigmas=[round(float(s), 6) for s in sigmas])

    def grid(step: int) -> None:
        if trainer.rank != 0:
            return
        with trainer.autocast():
            image = turbo_grid(trainer.module, teacher, encoder, vae, recipe, sigmas)
        rel = f"samples/turbo-step-{step:08d}.png"
        (run / "samples").mkdir(exist_ok=True)
        atomic.write_with(run / rel, lambda tmp: image.save(tmp, format="PNG"))
        events.emit(step=step, artifact=rel)

    if trainer.step == 0:
        grid(0)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        values = {"loss": metrics["loss"], **loss_fn.parts}
        bad = [(k, v) for k, v in values.items() if not math.isfinite(v)]
        if bad:
            good = latest(run / "checkpoints")
            raise RuntimeError(f"distill step {step}: {bad[0][0]} is {bad[0][1]}; stopped "
                               f"before saving, so the last good checkpoint "
                               f"({good or 'none yet'}) is kept. Lower distill.lr or "
                               f"distill.disc_lr, or use precision fp32, and rerun to resume")
        ida_update(holder["critic"].module.fake, trainer.module, d.ida_mu)
        img, txt = loss_fn.tokens
        fwd = forward_flops(cfg, img, txt)
        # per critic update: a backward simulation (<= N-1 forwards), 3 teacher feature
        # forwards and the fake score's training step; per student update the same simulation,
        # its training step, 3 teacher forwards (CA cond/uncond, DM), the fake's and a feature
        # forward with backward through it.
        n = d.student_steps
        flops = d.ttur * ((n - 1) * fwd + 3 * fwd + train_step_flops(cfg, img, txt)) + (
            (n - 1) * fwd + train_step_flops(cfg, img, txt) + 5 * fwd + 2 * fwd)
        counts = torch.tensor([flops, sum(img), len(img)], dtype=torch.float64,
                              device=trainer.device)
        if trainer.world_size > 1:
            dist.all_reduce(counts)
        ledger.step(float(counts[0]), int(counts[1]), int(counts[2]), metrics["step_s"])
        if step % d.log_every == 0 or step == d.steps:
            events.emit(step=step, metrics={**{f"train/{k}": v for k, v in metrics.items()},
                                            **loss_fn.parts, **ledger.metrics()})

    def on_save(step: int, path: Path) -> None:
        events.emit(step=step, checkpoint=str(path.relative_to(run)))

    start = time.perf_counter()
    step = trainer.fit(batches, d.steps, on_step, on_save)
    if trainer.rank != 0:
        return None
    grid(step)
    final = save_final(run, trainer.module, recipe, vae_dir, step)
    turbo = {"teacher": source, "steps": step, "sigmas": [float(s) for s in sigmas],
             "guidance": None}
    atomic.write_json(final / "lens.json", {**json.loads((final / "lens.json").read_text()),
                                            "turbo": turbo})
    events.emit(step=step, final={"model_dir": str(final), "steps": step,
                                  "train_seconds": time.perf_counter() - start, **turbo})
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", required=True, help="the resolved recipe (YAML)")
    ap.add_argument("--model", required=True, help="the teacher: a training final/")
    ap.add_argument("--dataset", required=True, help="dataset dir with manifest.parquet")
    ap.add_argument("--features", required=True, help="the feature cache root")
    ap.add_argument("--run-dir", dest="run", required=True, help="checkpoints, events, model")
    args = ap.parse_args(argv)
    recipe, run, dataset = start_program(args.params), Path(args.run), Path(args.dataset)
    teacher, encoder, vae, meta = load_parts(args.model)
    cache = FeatureCache(Path(args.features), encoder.identity(), vae.identity())
    long_captions = recipe.pretrain.short_caption_prob < 1.0
    rank, world = _rank_world()
    if rank == 0:
        build_feature_cache(cache, dataset, encoder, vae, long_captions=long_captions)
    if world > 1:
        from lens_model.train.engine import init_distributed

        init_distributed()
        dist.barrier()
    m = read_manifest(dataset)
    features: dict[str, Features] = {}
    for name in feature_shards(dataset, m, long_captions):
        features.update(cache.load(name))
    buckets = {k: b for k, b in zip(m.keys, m.buckets, strict=True) if k in features}
    train_distill(recipe, run, teacher, encoder, vae, features, buckets, meta["vae"],
                  str(Path(args.model).resolve()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
