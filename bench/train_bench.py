"""Tiny-model training throughput: the DeepSpeed engine versus a plain PyTorch loop (CPU).

    python -m bench.train_bench [--steps 10] [--warmup 3] [--rounds 4] [--threads 1] \\
        [--out bench/results/train_bench.json]

Both loops train the tiny-preset ``LensTransformer2DModel`` plus the tiny recipe's text
connector (2 MiniLM layers x 384 -> 128), from the same initial weights, on the same
synthetic packed batches (16 samples of 8x8 latent tokens in a 1024-token row, ~140 random
text hidden states per sample) with the same rectified-flow velocity loss, in one process:

- ``deepspeed``: ``lens_model.train.engine.Trainer`` (ZeRO 0, fp32, AdamW via ``torch_adam``,
  clipping 1.0, no EMA, no checkpoints), timed around ``Trainer.fit``;
- ``plain``: ``torch.optim.AdamW`` with the same lr, betas, eps and weight decay,
  ``clip_grad_norm_`` at 1.0, ``loss.item()`` each step as the trainer does.

Rounds alternate which loop goes first, so drift in the machine's load hits both alike.
Warm-up steps are run before timing and not counted. Both loops run with the same number
of torch threads (checked inside each timed block), 1 by default: on a shared 2-core machine
an OpenMP team larger than the free cores makes every parallel op wait for a descheduled
thread (2 threads beside one busy core ran 16x slower than 1 thread here), which would
swamp the engine overhead this measures. Reported: samples/s, real tokens/s (image + text),
median step time, and the DeepSpeed overhead (plain_sps / ds_sps - 1) * 100, target <= 15%.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lens_model import atomic, defaults
from lens_model.denoiser import LensDenoiser
from lens_model.flow_matching import (
    add_noise,
    per_token,
    sample_timesteps,
    velocity_loss,
)
from lens_model.packing import pack_tokens
from lens_model.text_encoder import TextConnector
from lens_model.train.engine import TrainConfig, Trainer
from lens_model.transformer import LensTransformer2DModel, pack_text

TEXT_LAYERS, TEXT_HIDDEN = 2, 384  # the tiny recipe's encoder: MiniLM layers [3, 6], 384 wide
TEXT_MULTIPLE = 16  # packed text length rounds up to this, as pretraining does
TARGET_OVERHEAD_PCT = 15.0

Batch = dict[str, Tensor]


def make_model(seed: int) -> LensDenoiser:
    """The tiny backbone plus the tiny recipe's text connector, seeded."""
    torch.manual_seed(seed)
    transformer = LensTransformer2DModel.from_preset("tiny")
    width = transformer.transformer_config.width
    connector = TextConnector(n_layers=TEXT_LAYERS, hidden=TEXT_HIDDEN, width=width)
    return LensDenoiser(transformer, connector)


def make_batches(n: int, samples: int, grid: int, budget: int, text_tokens: int,
                 channels: int, seed: int) -> list[Batch]:
    """``n`` packed rows of ``samples`` grid x grid latents and ~``text_tokens`` texts each."""
    if samples * grid * grid > budget:
        raise ValueError(f"--samples {samples} of {grid}x{grid} tokens hold "
                         f"{samples * grid * grid}, over --budget {budget}; lower one or "
                         f"raise the budget")
    if text_tokens < 2:
        raise ValueError(f"--text-tokens must be >= 2, got {text_tokens}")
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = [torch.randn(grid * grid, channels, generator=g) for _ in range(samples)]
        x0, seq = pack_tokens(tokens, [(grid, grid)] * samples, budget)  # (budget, C)
        spread = max(1, text_tokens // 8)  # lengths vary +-12%, as real captions do
        lengths = torch.randint(text_tokens - spread, text_tokens + spread + 1, (samples,),
                                generator=g).tolist()
        texts = [torch.randn(t, TEXT_LAYERS * TEXT_HIDDEN, generator=g) for t in lengths]
        total = sum(lengths)
        txt, txt_seg, txt_pos = pack_text(texts, -(-total // TEXT_MULTIPLE) * TEXT_MULTIPLE)
        out.append({"x0": x0, "img_seg": seq.segment_ids, "img_pos": seq.position_ids,
                    "txt": txt, "txt_seg": txt_seg, "txt_pos": txt_pos,
                    "counts": torch.tensor(seq.lengths)})
    return out


def velocity_loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    """Rectified-flow velocity loss on one packed row (noise and timesteps drawn here)."""
    x0, seg = batch["x0"], batch["img_seg"]
    t = sample_timesteps(batch["counts"])  # (S,), shifted by each sample's token count
    noise = torch.randn_like(x0)
    xt = add_noise(x0, noise, per_token(t, seg))  # (L, C)
    pred = model(xt[None], batch["txt"][None], t[None], seg[None], batch["txt_seg"][None],
                 batch["img_pos"][None], batch["txt_pos"][None])  # (1, L, C)
    return velocity_loss(pred[0], noise - x0, segment_ids=seg)


def tokens_per_batch(batch: Batch) -> int:
    """Real (non-padding) image plus text tokens in one packed row."""
    return int((batch["img_seg"] >= 0).sum() + (batch["txt_seg"] >= 0).sum())


@dataclass
class Steps:
    """What one block of steps saw: seconds per step, torch threads, the last loss."""

    step_s: list[float] = field(default_factory=list)
    threads: set[int] = field(default_factory=set)
    loss: float = float("nan")

    def add(self, seconds: float, loss: float) -> None:
        self.step_s.append(seconds)
        self.threads.add(torch.get_num_threads())
        self.loss = loss


class PlainLoop:
    """The reference: the same model, loss, AdamW and clipping with no engine around them."""

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.model = model
        self.clip = cfg.grad_clip
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=1e-8,
                                     weight_decay=cfg.weight_decay)

    def run(self, batches: Iterator[Batch], steps: int) -> Steps:
        """Train ``steps`` steps: per-step seconds, torch threads seen, the last loss."""
        self.model.train()
        out = Steps()
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = velocity_loss_fn(self.model, next(batches))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
            out.add(time.perf_counter() - t0, loss.item())
        return out


class DeepSpeedLoop:
    """The project's trainer: each ``run`` is one ``Trainer.fit`` call to ``step + steps``."""

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.trainer = Trainer(model, velocity_loss_fn, cfg)

    def run(self, batches: Iterator[Batch], steps: int) -> Steps:
        out = Steps()
        self.trainer.fit(batches, self.trainer.step + steps,
                         lambda _, m: out.add(m["step_s"], m["loss"]))
        return out


def timed(loop: PlainLoop | DeepSpeedLoop, batches: Iterator[Batch], steps: int,
          threads: int) -> dict[str, Any]:
    """One block of ``steps`` steps under ``threads`` torch threads, timed as a whole."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    got = loop.run(batches, steps)
    total = time.perf_counter() - start
    if got.threads != {threads}:
        raise RuntimeError(f"torch threads changed during a timed block ({sorted(got.threads)} "
                           f"vs {threads}); the comparison would be unfair")
    return {"seconds": total, "step_s": got.step_s, "loss": got.loss}


def summarise(blocks: list[dict[str, Any]], samples: int, tokens: float) -> dict[str, Any]:
    """Throughput over all timed blocks of one loop."""
    seconds = sum(b["seconds"] for b in blocks)
    steps = sum(len(b["step_s"]) for b in blocks)
    step_s = [s for b in blocks for s in b["step_s"]]
    return {"steps": steps, "seconds": round(seconds, 3),
            "samples_per_s": round(steps * samples / seconds, 2),
            "tokens_per_s": round(steps * tokens / seconds, 1),
            "step_ms_median": round(1000 * statistics.median(step_s), 2),
            "samples_per_s_by_round": [round(len(b["step_s"]) * samples / b["seconds"], 2)
                                       for b in blocks],
            "final_loss": round(blocks[-1]["loss"], 5)}


def bench(steps: int, warmup: int, rounds: int, threads: int, samples: int, grid: int,
          budget: int, text_tokens: int, seed: int = 0) -> dict[str, Any]:
    """Warm both loops up, then time ``rounds`` alternating blocks of ``steps`` steps each."""
    if steps < 1 or warmup < 0 or rounds < 1 or threads < 1:
        raise ValueError(f"need --steps >= 1, --warmup >= 0, --rounds >= 1, --threads >= 1; "
                         f"got {steps}, {warmup}, {rounds}, {threads}")
    import deepspeed

    torch.set_num_threads(threads)
    base = make_model(seed)
    channels = base.transformer.transformer_config.patch_dim
    data = make_batches(4, samples, grid, budget, text_tokens, channels, seed)
    tokens = statistics.mean(tokens_per_batch(b) for b in data)
    cfg = TrainConfig(lr=2e-4, grad_clip=1.0, zero_stage=0, precision="fp32", ema_decay=None,
                      ckpt_dir=None, seed=seed)
    loops: dict[str, PlainLoop | DeepSpeedLoop] = {"plain": PlainLoop(copy.deepcopy(base), cfg)}
    t0 = time.perf_counter()
    loops["deepspeed"] = DeepSpeedLoop(copy.deepcopy(base), cfg)
    ds_init_s = time.perf_counter() - t0
    streams = {name: itertools.cycle(data) for name in loops}
    for name, loop in loops.items():
        print(f"[train_bench] warm-up {name}: {warmup} steps", file=sys.stderr, flush=True)
        torch.set_num_threads(threads)
        loop.run(streams[name], warmup)
    blocks: dict[str, list[dict[str, Any]]] = {name: [] for name in loops}
    for r in range(rounds):
        order = ["plain", "deepspeed"] if r % 2 == 0 else ["deepspeed", "plain"]
        for name in order:
            blocks[name].append(timed(loops[name], streams[name], steps, threads))
            print(f"[train_bench] round {r + 1}/{rounds} {name}: "
                  f"{steps * samples / blocks[name][-1]['seconds']:.1f} samples/s",
                  file=sys.stderr, flush=True)
    plain = summarise(blocks["plain"], samples, tokens)
    ds = summarise(blocks["deepspeed"], samples, tokens) | {
        "init_s": round(ds_init_s, 2)}
    overhead = (plain["samples_per_s"] / ds["samples_per_s"] - 1) * 100
    params = sum(p.numel() for p in base.parameters())
    return {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                    "deepspeed": deepspeed.__version__, "torch_threads": threads,
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
        "model": {"preset": "tiny", "params": params,
                  "connector": f"{TEXT_LAYERS} x {TEXT_HIDDEN} -> "
                               f"{base.transformer.transformer_config.width}"},
        "data": {"samples_per_step": samples, "image_tokens_per_sample": grid * grid,
                 "image_budget": budget, "text_tokens_per_sample": text_tokens,
                 "real_tokens_per_step": tokens, "distinct_batches": len(data)},
        "settings": {"steps_per_round": steps, "warmup_steps": warmup, "rounds": rounds,
                     "lr": cfg.lr, "grad_clip": cfg.grad_clip, "zero_stage": cfg.zero_stage,
                     "precision": cfg.precision},
        "plain": plain,
        "deepspeed": ds,
        "overhead_pct": round(overhead, 2),
        "target_overhead_pct": TARGET_OVERHEAD_PCT,
        "within_target": overhead <= TARGET_OVERHEAD_PCT,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per loop per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per loop first")
    ap.add_argument("--rounds", type=int, default=4, help="alternating timed rounds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both loops")
    ap.add_argument("--samples", type=int, default=16, help="samples packed per row")
    ap.add_argument("--grid", type=int, default=8, help="latent tokens per side per sample")
    ap.add_argument("--budget", type=int, default=1024, help="image tokens per packed row")
    ap.add_argument("--text-tokens", type=int, default=140, help="mean text tokens per sample")
    ap.add_argument("--out", default="bench/results/train_bench.json")
    args = ap.parse_args()
    defaults.apply()  # DeepSpeed reads DS_ACCELERATOR and TORCH_EXTENSIONS_DIR when it starts
    results = bench(args.steps, args.warmup, args.rounds, args.threads, args.samples,
                    args.grid, args.budget, args.text_tokens)
    text = json.dumps(results, indent=2)
    print(text)
    atomic.write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
