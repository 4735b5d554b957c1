"""Lens RL: DiffusionNFT with rubric rewards on a LoRA adapter, through the DeepSpeed trainer.

The same program runs the tiny recipe on one CPU and the paper's recipe on GPU nodes::

    python lens_model/train/rl.py --params RUN/recipe.yaml --model PRETRAIN/final \\
        --prompts PROMPTS/prompts.parquet --run-dir RUN
    python -m torch.distributed.run --nproc_per_node 8 lens_model/train/rl.py ...   # a node

Each step every rank rolls out its share of the prompt groups with the current policy (no
CFG), the judge answers each prompt's rubrics, rewards are normalised per group, and one
DiffusionNFT update follows (``lens_model/rl/nft.py``). It resumes from the newest checkpoint in
``RUN/checkpoints`` by itself: adapter, old adapter, optimizer, RNG streams and the prompt
sampler's position. Rank 0 appends events to ``RUN/events.jsonl`` (per-step reward, per-rubric
pass rates, losses, the gold set's score, diversity, the compute ledger, sample grids) and
saves the merged model in ``RUN/final`` and the adapter alone in ``RUN/adapter``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

from lens_model import atomic
from lens_model.buckets import buckets_for
from lens_model.denoiser import LensDenoiser
from lens_model.flops import forward_flops, train_step_flops
from lens_model.flow_matching import add_noise, per_token, sample_timesteps, shift_mu
from lens_model.packing import pack_tokens
from lens_model.pipeline import LensPipeline, parse_size
from lens_model.recipe import Recipe
from lens_model.rl.judge import Judge, ShapesJudge, Verdict
from lens_model.rl.nft import NFTPolicy, adapter_state, merged, nft_loss, normalise_rewards
from lens_model.rl.prompts import RLPrompt, read_prompts
from lens_model.rl.rubrics import INTEGRITY
from lens_model.rollout import rollout
from lens_model.train.engine import StepCounted, TrainConfig, Trainer
from lens_model.train.ledger import ComputeLedger
from lens_model.train.pretrain import TEXT_MULTIPLE, Events, save_final, start_program
from lens_model.transformer import pack_text, patchify

GOLD_SEED = 10_000  # gold images draw noise from seeds GOLD_SEED + i: the same every time
GRID_PROMPTS = 8


@dataclass
class RLBatch:
    """One micro-batch of judged rollouts: clean latents, prompt states, normalised rewards."""

    latents: list[Tensor]  # (C, h, w) each
    hidden: list[Tensor]  # (T_i, L*D) each
    rewards: Tensor  # (S,) in [0, 1]


@dataclass
class StepStats:
    """What a step's rollouts showed, for the event log and the ledger."""

    metrics: dict[str, float] = field(default_factory=dict)
    img_tokens: list[int] = field(default_factory=list)
    txt_tokens: list[int] = field(default_factory=list)
    model_evals: int = 1  # transformer calls per image while sampling


def rubric_rates(verdicts: list[Verdict | None], rubrics: list[dict[str, dict]],
                 prefix: str) -> dict[str, float]:
    """Pass rates per rubric kind (``count``, ``color``, ...) and of the global rubric."""
    hits: dict[str, list[bool]] = {}
    for verdict, named in zip(verdicts, rubrics, strict=True):
        if verdict is None:
            continue
        for name, passed in verdict.passed.items():
            kind = INTEGRITY if name == INTEGRITY else named[name]["kind"]
            hits.setdefault(kind, []).append(passed)
    return {f"{prefix}/{k}": sum(v) / len(v) for k, v in sorted(hits.items())}


def to_images(vae: Any, latents: list[Tensor]) -> list[Image.Image]:
    """Decode latents of any sizes (one batch per size) into RGB images, in order."""
    out: list[Image.Image | None] = [None] * len(latents)
    shapes: dict[tuple[int, ...], list[int]] = {}
    for i, z in enumerate(latents):
        shapes.setdefault(tuple(z.shape), []).append(i)
    device = next(vae.parameters()).device
    with torch.no_grad():
        for members in shapes.values():
            z = torch.stack([latents[i] for i in members]).to(device, torch.float32)
            pixels = ((vae.decode_latent(z).float().clamp(-1, 1) + 1) * 127.5).round().byte()
            for i, p in zip(members, pixels.permute(0, 2, 3, 1).cpu().numpy(), strict=True):
                out[i] = Image.fromarray(p)
    return [im for im in out if im is not None]


def diversity(images: list[Image.Image], groups: int) -> float:
    """Mean pairwise pixel distance (mean |a - b| in [0, 1]) within each group, averaged: a
    policy collapsing onto one picture per prompt drives it to 0."""
    size = len(images) // groups
    dists = []
    for g in range(groups):
        arrs = [np.asarray(im, dtype=np.float32) / 255 for im in images[g * size:(g + 1) * size]]
        dists += [float(np.abs(a - b).mean()) for i, a in enumerate(arrs) for b in arrs[i + 1:]
                  if a.shape == b.shape]
    return float(np.mean(dists)) if dists else 0.0


class Rollouts(StepCounted):
    """The trainer's batch source: each step, this rank's prompt groups rolled out by the
    current policy, judged and normalised, split into ``micro`` micro-batches. Its state is
    the step count: which prompts, sizes and seeds a step draws follows from (seed, step,
    rank), so a resumed run draws what the straight run drew."""

    def __init__(self, policy: NFTPolicy, recipe: Recipe, prompts: list[RLPrompt],
                 hidden: dict[str, Tensor], vae: Any, judge: Judge, rank: int, world: int,
                 micro: int, autocast: Callable[[], AbstractContextManager]) -> None:
        rl = recipe.rl
        if rl.groups % world:
            raise ValueError(f"rl.groups={rl.groups} does not split over {world} ranks; make it "
                             f"a multiple of the world size")
        if not prompts:
            raise ValueError("the RL prompt set has no train prompts; rebuild it with more "
                             "rl.num_prompts or a smaller rl.gold_frac")
        self.policy, self.recipe, self.prompts, self.hidden = policy, recipe, prompts, hidden
        self.vae, self.judge, self.rank, self.micro, self.autocast = vae, judge, rank, micro, \
            autocast
        self.groups = rl.groups // world
        self.patch = policy.denoiser.transformer.transformer_config.patch_size
        self.sizes = [parse_size(s) for s in rl.sizes] or sorted(
            {(b.width, b.height) for b in buckets_for(recipe.buckets)})
        self.step = 0
        self.stats = StepStats()

    def __iter__(self) -> Iterator[RLBatch]:
        k, drawn = self.recipe.rl.updates_per_rollout, None
        while True:
            if self.step % k == 0:
                drawn, fresh = self._next_step(), self.stats
            elif drawn is None:  # checkpoints fall between rollout batches (the recipe checks)
                raise RuntimeError(f"RL resumed at step {self.step}, inside a rollout batch of "
                                   f"rl.updates_per_rollout={k} updates; resume from a "
                                   f"checkpoint at a multiple of {k}")
            else:  # another update on the same rollouts: no sampling to book
                self.step += 1
                self.stats = StepStats({**fresh.metrics, "rl/rollout_s": 0.0}, fresh.img_tokens,
                                       fresh.txt_tokens, 0)
            yield from drawn

    def _next_step(self) -> list[RLBatch]:
        rl, seed = self.recipe.rl, self.recipe.seed
        rng = random.Random(f"rl/{seed}/{self.step}/{self.rank}")
        picks = rng.sample(range(len(self.prompts)), min(self.groups, len(self.prompts)))
        picks += rng.choices(range(len(self.prompts)), k=self.groups - len(picks))
        chosen = [self.prompts[i] for i in picks for _ in range(rl.group_size)]
        sizes = [s for _ in picks for s in [rng.choice(self.sizes)] * rl.group_size]
        seeds = [rng.getrandbits(62) for _ in chosen]
        started = time.perf_counter()
        latents, verdicts, images = sample_and_judge(
            self.policy, chosen, [self.hidden[p.prompt_id] for p in chosen], sizes, seeds,
            self.vae, self.judge, self.recipe, self.autocast)
        raw = torch.tensor([v.reward if v is not None else float("nan") for v in verdicts])
        rewards = normalise_rewards(raw.reshape(self.groups, rl.group_size), rl.adv_clip)
        rewards = rewards.reshape(-1)
        valid = [i for i in range(len(chosen)) if verdicts[i] is not None]
        if not valid:
            raise RuntimeError(f"RL step {self.step + 1}: the judge failed on every rollout; "
                               f"check its endpoint (rl.endpoint) and its log")
        done = [v for v in verdicts if v is not None]
        self.stats = StepStats(
            {"rl/reward": float(np.mean([v.reward for v in done])),
             "rl/failed_judgements": float(len(verdicts) - len(done)),
             "rl/diversity": diversity(images, self.groups),
             "rl/rollout_s": time.perf_counter() - started,
             **rubric_rates(verdicts, [p.rubrics for p in chosen], "rubric")},
            [(z.shape[1] // self.patch) * (z.shape[2] // self.patch) for z in latents],
            [self.hidden[p.prompt_id].shape[0] for p in chosen],
            2 * rl.sample_steps - 1 if rl.sampler == "heun" else rl.sample_steps)
        self.step += 1
        if len(valid) < self.micro:
            raise RuntimeError(f"RL step {self.step}: {len(valid)} judged rollouts cannot fill "
                               f"{self.micro} micro-batches; the judge failed on the rest")
        parts = np.array_split(np.array(valid), self.micro)
        return [RLBatch([latents[i] for i in part], [self.hidden[chosen[i].prompt_id]
                                                       for i in part], rewards[part])
                for part in parts]


def sample_and_judge(policy: NFTPolicy, prompts: list[RLPrompt], hidden: list[Tensor],
                     sizes: list[tuple[int, int]], seeds: list[int], vae: Any, judge: Judge,
                     recipe: Recipe, autocast: Callable[[], AbstractContextManager]
                     ) -> tuple[list[Tensor], list[Verdict | None], list[Image.Image]]:
    """The policy's no-CFG samples of ``prompts`` and the judge's verdicts on them."""
    rl = recipe.rl
    was_training = policy.training
    policy.eval()
    with torch.no_grad(), autocast():
        latents = rollout(policy.denoiser, hidden, sizes, seeds, rl.sample_steps,
                          vae.downsample, recipe.pretrain.mu_rule(),
                          order=2 if rl.sampler == "heun" else 1)
    policy.train(was_training)
    latents = [z.float().cpu() for z in latents]
    images = to_images(vae, latents)
    verdicts = judge.judge(images, [p.rubrics for p in prompts], [p.spec for p in prompts])
    return latents, verdicts, images


class NFTLoss:
    """A micro-batch's clean latents packed into one row, noised at pretraining's timestep law,
    and the DiffusionNFT loss of the policy against its old copy and the base model."""

    def __init__(self, recipe: Recipe, patch: int) -> None:
        self.recipe, self.patch = recipe, patch
        self.parts: dict[str, float] = {}

    def __call__(self, engine: Any, batch: RLBatch) -> Tensor:
        device = engine.device if hasattr(engine, "device") else torch.device("cpu")
        tokens = [patchify(z[None], self.patch)[0] for z in batch.latents]  # (N_i, 4C)
        grids = [(z.shape[1] // self.patch, z.shape[2] // self.patch) for z in batch.latents]
        total = sum(len(t) for t in tokens)
        x0, seq = pack_tokens(tokens, grids, -(-total // TEXT_MULTIPLE) * TEXT_MULTIPLE)
        lt = max(1, sum(len(h) for h in batch.hidden))
        txt, txt_seg, txt_pos = pack_text(batch.hidden, -(-lt // TEXT_MULTIPLE) * TEXT_MULTIPLE)
        p = self.recipe.pretrain
        counts = torch.tensor([len(t) for t in tokens])
        t = sample_timesteps(counts, mean=p.timestep_mean, std=p.timestep_std,
                             shift_rule=lambda n: shift_mu(n, **p.mu_rule()))
        noise = torch.randn_like(x0)
        xt = add_noise(x0, noise, per_token(t, seq.segment_ids))
        args = [a[None].to(device) for a in (xt, txt, t, seq.segment_ids, txt_seg,
                                             seq.position_ids, txt_pos)]
        policy = engine.module if hasattr(engine, "module") else engine
        v = engine(*args)[0]
        v_old = policy.old(*args)[0]
        v_base = policy.base(*args)[0] if self.recipe.rl.kl_weight > 0 else v.detach()
        rl = self.recipe.rl
        loss, self.parts = nft_loss(v, v_old, v_base, (noise - x0).to(device),
                                    batch.rewards.to(device), seq.segment_ids.to(device),
                                    rl.beta, rl.kl_weight)
        return loss


def load_parts(model_dir: str | Path) -> tuple[LensDenoiser, Any, Any, dict[str, Any]]:
    """The pretrained model's denoiser, language encoder and VAE, and its lens.json."""
    pipe = LensPipeline.from_training(model_dir)
    meta = json.loads((Path(model_dir) / "lens.json").read_text())
    return LensDenoiser(pipe.transformer, pipe.connector), pipe.encoder, pipe.semantic_vae, meta


def encode_prompts(encoder: Any, prompts: list[RLPrompt], batch: int = 64
                   ) -> dict[str, Tensor]:
    """Frozen-LM hidden states of every prompt, unpadded (T_i, L*D), once for the whole run."""
    out = {}
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            part = prompts[start:start + batch]
            states, mask = encoder.hidden([p.text for p in part])
            for j, p in enumerate(part):
                out[p.prompt_id] = states[j, :int(mask[j].sum())].float().cpu()
    return out


def make_judge(recipe: Recipe) -> Judge:
    if recipe.rl.judge == "openai":
        from lens_model.rl.vlm_judge import OpenAIJudge

        return OpenAIJudge(recipe.rl.endpoint)
    return ShapesJudge()


def image_grid(images: list[Image.Image], scale: int = 3) -> Image.Image:
    w, h = images[0].size
    grid = Image.new("RGB", (w * scale * len(images), h * scale), "white")
    for i, im in enumerate(images):
        grid.paste(im.resize((w * scale, h * scale), Image.Resampling.NEAREST), (i * w * scale, 0))
    return grid


def train_rl(recipe: Recipe, run: Path, denoiser: LensDenoiser, encoder: Any, vae: Any,
             prompts: list[RLPrompt], judge: Judge, vae_dir: str, source: str
             ) -> NFTPolicy:
    """RL-train ``denoiser`` (the pretrained model from ``source``) on the train ``prompts``
    with ``judge``'s rewards, logging to ``run``; saves ``run/final`` (merged, on rank 0) and
    ``run/adapter``, and returns the policy."""
    rl = recipe.rl
    run.mkdir(parents=True, exist_ok=True)
    train = [p for p in prompts if p.split == "train"]
    gold = [p for p in prompts if p.split == "gold"][:rl.gold_prompts]
    hidden = encode_prompts(encoder, train + gold)
    policy = NFTPolicy(denoiser, rl.lora_rank, rl.lora_alpha, list(rl.lora_targets))
    config = TrainConfig(lr=rl.lr, weight_decay=rl.weight_decay, betas=tuple(rl.betas),
                         grad_clip=rl.grad_clip, zero_stage=rl.zero_stage,
                         precision=rl.precision, ema_decay=None, ckpt_every=rl.ckpt_every,
                         keep_last=rl.keep_last, ckpt_dir=run / "checkpoints", seed=recipe.seed)
    loss_fn = NFTLoss(recipe, denoiser.transformer.transformer_config.patch_size)
    trainer = Trainer(policy, loss_fn, config)
    vae.to(trainer.device)
    rollouts = Rollouts(policy, recipe, train, hidden, vae, judge, trainer.rank,
                        trainer.world_size, trainer.accum, trainer.autocast)
    events = Events(run, trainer.rank)
    device = torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu"
    ledger = ComputeLedger(device, trainer.world_size)
    trainer.stateful["ledger"] = ledger
    gold_log = GoldLog()
    trainer.stateful["gold"] = gold_log
    trainer.restore(rollouts)
    cfg = denoiser.transformer.transformer_config
    events.emit(step=trainer.step, metrics={
        "model/adapter_params": float(sum(p.numel() for p in policy.parameters()
                                          if p.requires_grad)),
        "compute/deepspeed_init_s": trainer.init_s}, resumed_from=str(trainer.resumed_from or ""))
    width, height = parse_size(recipe.eval.size)

    def gold_eval(step: int) -> None:
        """Rank 0: the gold set's reward and rubric rates, and its first images as a grid."""
        if trainer.rank != 0 or not gold:
            return
        latents, verdicts, images = sample_and_judge(
            policy, gold, [hidden[p.prompt_id] for p in gold], [(width, height)] * len(gold),
            [GOLD_SEED + i for i in range(len(gold))], vae, judge, recipe, trainer.autocast)
        done = [v.reward for v in verdicts if v is not None]
        score = float(np.mean(done)) if done else float("nan")
        gold_log.gold.append((step, score))
        rel = f"samples/gold-step-{step:08d}.png"
        (run / "samples").mkdir(exist_ok=True)
        grid = image_grid(images[:GRID_PROMPTS])
        atomic.write_with(run / rel, lambda tmp: grid.save(tmp, format="PNG"))
        flagged = gold_log.hacking(rl.gold_every)
        events.emit(step=step, metrics={"gold/reward": score, "rl/reward_hacking": float(flagged),
                                        **rubric_rates(verdicts, [p.rubrics for p in gold],
                                                       "gold")},
                    artifact=rel)

    if trainer.step == 0:
        gold_eval(0)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if step % rl.updates_per_rollout == 0:  # the next rollouts come from this policy
            policy.update_old(rl.old_decay)
        st = rollouts.stats
        gold_log.train.append(st.metrics["rl/reward"])
        rollout_flops = st.model_evals * forward_flops(cfg, st.img_tokens, st.txt_tokens)
        update_flops = (train_step_flops(cfg, st.img_tokens, st.txt_tokens)
                        + 2 * forward_flops(cfg, st.img_tokens, st.txt_tokens))  # old + base
        counts = torch.tensor([rollout_flops + update_flops, sum(st.img_tokens),
                               len(st.img_tokens)], dtype=torch.float64, device=trainer.device)
        if trainer.world_size > 1:
            dist.all_reduce(counts)
        ledger.step(float(counts[0]), int(counts[1]), int(counts[2]),
                    metrics["step_s"] + st.metrics["rl/rollout_s"])
        if step % rl.log_every == 0 or step == rl.steps:
            events.emit(step=step, metrics={**{f"train/{k}": v for k, v in metrics.items()},
                                            **st.metrics, **loss_fn.parts, **ledger.metrics(),
                                            "compute/rollout_flops": float(rollout_flops)})
        if step % rl.gold_every == 0 or step == rl.steps:
            gold_eval(step)

    def on_save(step: int, path: Path) -> None:
        events.emit(step=step, checkpoint=str(path.relative_to(run)))

    start = time.perf_counter()
    step = trainer.fit(rollouts, rl.steps, on_step, on_save)
    if trainer.rank == 0:
        final = save_final(run, merged(policy.denoiser), recipe, vae_dir, step)
        # Rollouts are drawn without CFG (DiffusionNFT is CFG-free); the model still takes
        # CFG at inference, as the Lens paper's RL model is scored (20 steps, CFG 5).
        info = {"from": source, "steps": step, "rollout_cfg": None, "sampler": rl.sampler,
                "lora": {"rank": rl.lora_rank, "alpha": rl.lora_alpha,
                         "targets": list(rl.lora_targets)}}
        atomic.write_json(final / "lens.json", {**json.loads((final / "lens.json").read_text()),
                                                "rl": info})
        with atomic.atomic_dir(run / "adapter") as tmp:
            save_file(adapter_state(policy.denoiser), str(tmp / "adapter.safetensors"))
            atomic.write_json(tmp / "adapter_config.json", info)
        events.emit(step=step, final={
            "model_dir": str(final), "adapter_dir": str(run / "adapter"), "steps": step,
            "train_seconds": time.perf_counter() - start, "gold": gold_log.gold,
            "reward_start": gold_log.mean_reward(rl.gold_every, last=False),
            "reward_end": gold_log.mean_reward(rl.gold_every, last=True),
            "reward_hacking": gold_log.hacking(rl.gold_every)})
    return policy


class GoldLog:
    """The training reward of every step and the gold score of every gold evaluation, the
    reward-hacking watch's evidence; rides in checkpoints."""

    def __init__(self, margin: float = 0.02) -> None:
        self.margin = margin
        self.train: list[float] = []
        self.gold: list[tuple[int, float]] = []

    def mean_reward(self, window: int, last: bool) -> float | None:
        """The training reward's mean over the first (or ``last``) ``window`` steps."""
        if not self.train:
            return None
        n = max(1, min(window, len(self.train) // 2))
        return float(np.mean(self.train[-n:] if last else self.train[:n]))

    def hacking(self, window: int) -> bool:
        """The training reward rose (mean of the last ``window`` steps against the first) while
        the gold score fell since the first gold evaluation, each by more than the margin."""
        if len(self.gold) < 2 or len(self.train) < 2:
            return False
        rise = self.mean_reward(window, last=True) - self.mean_reward(window, last=False)
        fall = self.gold[0][1] - self.gold[-1][1]
        return bool(rise > self.margin and fall > self.margin)

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train, "gold": self.gold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train = list(state["train"])
        self.gold = [(int(s), float(g)) for s, g in state["gold"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", required=True, help="the resolved recipe (YAML)")
    ap.add_argument("--model", required=True, help="the pretrained model: a training final/")
    ap.add_argument("--prompts", required=True, help="the RL prompt set (Parquet)")
    ap.add_argument("--run-dir", dest="run", required=True, help="checkpoints, events, model")
    args = ap.parse_args(argv)
    recipe, run = start_program(args.params), Path(args.run)
    denoiser, encoder, vae, meta = load_parts(args.model)
    train_rl(recipe, run, denoiser, encoder, vae, read_prompts(args.prompts), make_judge(recipe),
             meta["vae"], str(Path(args.model).resolve()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
