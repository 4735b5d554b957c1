"""Training-step time and MFU of lens-3.8b on one GPU (a lent H100), bf16, random weights:
the path pretraining runs, and the ideal one-segment step beside it, in one call.

    python -m bench.gpu_train [--parts real,real_square,ideal] [--steps 10] [--warmup 3] \\
        [--out bench/results/gpu_train.json]
    python -m bench.gpu_train --smoke --out /tmp/gpu_train_smoke.json   # CPU, tiny, seconds

``real``: the step as pretraining takes it. The recipe's DeepSpeed ``Trainer`` (its ZeRO stage,
bf16, EMA, activation checkpointing and AdamW) runs pretraining's ``LossFn`` on packed rows of
random buckets of all the recipe's sizes, up to its token budget (24576 image tokens a rank
for lens-3.8b), so attention runs the segment-masked path (FlexAttention on CUDA). Text
features are random (256 tokens a sample, the language model's width), as a feature cache
gives them: the frozen encoders are not in the timed step. One GPU holds no ZeRO shard of
anyone else, so the model is cut to the most blocks whose memory plan
(``lens_model.memory_plan``) fits the free memory; FLOPs are counted for the depth run.
``real_square``: the same with every sample at 1024x1024 (the issue's MFU target bucket).

``ideal``: one 1024^2 sample (4096 image tokens) plus 256 text tokens, one segment, no
padding, so attention is SDPA's flash kernel (forced, so that a silent fallback cannot
flatter or spoil the number); plain PyTorch AMP (fp32 master weights, bf16 autocast) and
fused AdamW, no DeepSpeed and no EMA. ``--blocks auto`` takes all 48 blocks if the weights,
grads, Adam state and activations fit the free memory, else the most that fit, and falls
back by a quarter on an out-of-memory error.

Timing: ``real`` takes the trainer's wall time per step (it synchronizes to report the loss);
``ideal`` CUDA events around each step. Warm-up steps are excluded. Reported: median
ms/step, achieved TFLOP/s, MFU (model FLOPs = 3 x forward, ``lens_model.flops``) against the
device's peak bf16 rate (``lens_model.train.ledger.PEAK_TFLOPS``, 989 for H100), peak memory,
the device name and the torch version. ``--smoke`` runs the same code on CPU with the tiny
recipe and preset in fp32 (1 warm-up + 2 steps) and writes the same keys, with MFU null.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from lens_model import atomic
from lens_model.buckets import Bucket, buckets_for
from lens_model.config import TransformerConfig, get_preset
from lens_model.data.loader import Batch
from lens_model.flops import forward_flops, memory_bytes, param_count
from lens_model.flow_matching import add_noise, velocity_loss
from lens_model.packing import pack_by_tokens
from lens_model.recipe import Recipe, load_recipe
from lens_model.train.ledger import peak_tflops_for
from lens_model.transformer import (
    LensTransformer2DModel,
    image_position_ids,
    text_position_ids,
)

GIB = 2**30
# GPT-OSS-20B's architecture (its published config.json), the lens-3.8b text encoder: no
# weights can be had here, so the benchmarks build it from this config with random weights.
GPT_OSS_20B: dict[str, Any] = {
    "model_type": "gpt_oss", "hidden_size": 2880, "num_hidden_layers": 24,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
    "intermediate_size": 2880, "num_local_experts": 32, "num_experts_per_tok": 4,
    "vocab_size": 201088, "sliding_window": 128, "rope_theta": 150000.0,
    "max_position_embeddings": 131072, "attention_bias": True, "swiglu_limit": 7.0,
    "rms_norm_eps": 1e-5, "rope_scaling": {"rope_type": "yarn", "factor": 32.0,
                                           "beta_fast": 32.0, "beta_slow": 1.0,
                                           "original_max_position_embeddings": 4096},
}
MINILM_HIDDEN = 384  # all-MiniLM-L6-v2, the tiny recipe's encoder


def log(msg: str) -> None:
    print(f"[{Path(sys.argv[0]).stem}] {msg}", file=sys.stderr, flush=True)


def device_info(device: torch.device) -> dict[str, Any]:
    """Device name, torch and CUDA versions, and the device's peak bf16 TFLOP/s (None: unknown)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                "peak_tflops": peak_tflops_for(name)}
    return {"device": f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__,
            "cuda": None, "peak_tflops": None}


def sig(x: float | None, digits: int = 4) -> float | None:
    """``x`` to ``digits`` significant figures (tiny CPU rates must not round to 0)."""
    return None if x is None else float(f"{x:.{digits}g}")


class StepTimer:
    """Marks inside steps: CUDA events on a GPU (no sync until ``ms``), wall clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def ms(self) -> list[float]:
        """Milliseconds between consecutive marks (synchronizes the GPU once)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [1000 * (b - a) for a, b in zip(self.marks, self.marks[1:], strict=False)]


# SDPA's flash kernel only (CUDA bf16 and CPU fp32 both have one): an unmasked row must never
# fall back to the math path unnoticed.
FLASH = [SDPBackend.FLASH_ATTENTION]


def synthetic_inputs(cfg: TransformerConfig, batch: int, rows: int, cols: int, text: int,
                     device: torch.device, dtype: torch.dtype,
                     seed: int = 0) -> dict[str, Tensor]:
    """One segment per row, no padding: random latent tokens and text features, t in (0, 1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    n = rows * cols
    img_pos = image_position_ids(rows, cols, device).expand(batch, -1, -1)  # (B, N, 3)
    txt_mask = torch.ones(batch, text, dtype=torch.bool, device=device)
    return {
        "img": torch.randn(batch, n, cfg.patch_dim, generator=g, device=device, dtype=dtype),
        "txt": torch.randn(batch, text, cfg.text_dim, generator=g, device=device, dtype=dtype),
        "t": torch.rand(batch, 1, generator=g, device=device),
        "img_seg": torch.zeros(batch, n, dtype=torch.long, device=device),
        "txt_seg": torch.zeros(batch, text, dtype=torch.long, device=device),
        "img_pos": img_pos, "txt_pos": text_position_ids(txt_mask),
    }


@contextmanager
def built_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules made inside are initialised directly on ``device`` in ``dtype``: no detour
    through host memory or an fp32 copy (16 GB for the 3.8B backbone, 84 for GPT-OSS-20B)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(before)


def build_model(preset: str, blocks: int | None, device: torch.device,
                dtype: torch.dtype = torch.float32, **overrides: Any) -> LensTransformer2DModel:
    """The preset (at ``blocks`` depth if given), built on ``device`` in ``dtype``."""
    with built_on(device, dtype):
        return LensTransformer2DModel.from_preset(
            preset, **overrides, **({} if blocks is None else {"depth": blocks}))


def token_grid(resolution: int, token_px: int) -> tuple[int, int]:
    """Token rows and columns of a square image (VAE factor x patch size = ``token_px``)."""
    if resolution <= 0 or token_px <= 0 or resolution % token_px:
        raise ValueError(f"--resolution {resolution} must be a positive multiple of "
                         f"--token-px {token_px}")
    side = resolution // token_px
    return side, side


def auto_blocks(preset: str, tokens: int, batch: int, device: torch.device) -> int:
    """The most blocks whose weights, grads, Adam state and activations fit free GPU memory."""
    full = get_preset(preset).depth
    if device.type != "cuda":
        return full
    free, _ = torch.cuda.mem_get_info(device)
    budget = 0.9 * free - 2 * GIB  # cuBLAS workspaces, allocator slack
    one_block = param_count(get_preset(preset, depth=2)) - param_count(get_preset(preset, depth=1))
    for depth in range(full, 0, -1):
        cfg = get_preset(preset, depth=depth)
        # The peak is in backward: fp32 weights, grads and Adam m, v (16 B a parameter). The
        # forward's bf16 weight casts (2 B) come before the grads exist (zero_grad sets None).
        state = memory_bytes(cfg, weights_dtype_bytes=4)["total"]
        # checkpointed block inputs, plus one block recomputed (and its casts) in backward
        acts = batch * tokens * cfg.width * 2 * depth + 2 * one_block
        acts += batch * tokens * (16 * cfg.width + 6 * cfg.mlp_hidden) * 4
        if state + acts <= budget:
            return depth
    raise RuntimeError(f"not even one {preset} block fits the {free / GIB:.1f} GiB free on "
                       f"{device}; free the GPU or pick a smaller preset")


class TrainStep:
    """Forward + backward + AdamW of the rectified-flow velocity loss on fixed inputs."""

    def __init__(self, model: LensTransformer2DModel, inputs: dict[str, Tensor], bf16: bool,
                 lr: float = 1e-4) -> None:
        self.model, self.inputs, self.bf16 = model, inputs, bf16
        fused = next(model.parameters()).device.type == "cuda"
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused)
        self.noise = torch.randn_like(inputs["img"])
        self.device = inputs["img"].device

    def __call__(self, timer: StepTimer) -> Tensor:
        """One step with three marks (start, after backward, after the optimizer); the loss."""
        x = self.inputs
        timer.mark()
        self.opt.zero_grad(set_to_none=True)
        with (torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16),
              sdpa_kernel(FLASH)):
            xt = add_noise(x["img"], self.noise, x["t"][:, 0])  # (B, N, C)
            pred = self.model(xt, x["txt"], x["t"], x["img_seg"], x["txt_seg"], x["img_pos"],
                              x["txt_pos"])
            loss = velocity_loss(pred, self.noise - x["img"])
        with sdpa_kernel(FLASH):  # checkpointed blocks recompute their forward in backward
            loss.backward()
        timer.mark()
        self.opt.step()
        timer.mark()
        return loss.detach()


def run_steps(step: TrainStep, warmup: int, steps: int) -> tuple[list[float], list[float], float]:
    """Warm up, then time ``steps`` steps: (fwd+bwd ms, optimizer ms) per step, last loss."""
    for i in range(warmup):
        loss = step(StepTimer(step.device))
        log(f"warm-up step {i + 1}/{warmup}: loss {float(loss):.4f}")
    timer = StepTimer(step.device)
    losses = [step(timer) for _ in range(steps)]
    ms = timer.ms()
    fwd_bwd = ms[0::3]  # marks per step: start, after backward, after optimizer
    opt = ms[1::3]
    return fwd_bwd, opt, float(losses[-1])


def train_bench(preset: str, blocks: int | None, batch: int, resolution: int, token_px: int,
                text: int, warmup: int, steps: int, device: torch.device,
                bf16: bool) -> dict[str, Any]:
    """Build the model at ``blocks`` depth (None: auto), time its training step, report MFU."""
    if steps < 1 or warmup < 0 or batch < 1 or text < 1:
        raise ValueError(f"need --steps >= 1, --warmup >= 0, --batch >= 1, --text-tokens >= 1; "
                         f"got {steps}, {warmup}, {batch}, {text}")
    full = get_preset(preset).depth
    if blocks is not None and not 1 <= blocks <= full:
        raise ValueError(f"--blocks {blocks} is outside 1..{full} for {preset}")
    rows, cols = token_grid(resolution, token_px)
    tokens = rows * cols + text
    depth = blocks or auto_blocks(preset, tokens, batch, device)
    while True:
        log(f"building {preset} with {depth}/{full} blocks on {device}")
        try:
            model = build_model(preset, depth, device)
            model.enable_gradient_checkpointing()
            model.train()
            dtype = torch.float32  # AMP: fp32 inputs and weights, bf16 compute under autocast
            inputs = synthetic_inputs(model.transformer_config, batch, rows, cols, text,
                                      device, dtype)
            step = TrainStep(model, inputs, bf16)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            fwd_bwd, opt, loss = run_steps(step, warmup, steps)
            break
        except torch.OutOfMemoryError:
            if blocks is not None or depth == 1:
                raise
        # out of memory: free everything (outside the except, whose traceback holds tensors)
        model = step = inputs = None
        gc.collect()
        torch.cuda.empty_cache()
        depth = max(1, depth * 3 // 4)
        log(f"out of GPU memory; retrying with {depth} blocks")
    log(f"{len(fwd_bwd)} timed steps: median {statistics.median(fwd_bwd):.1f} ms fwd+bwd, "
        f"{statistics.median(opt):.1f} ms optimizer")
    return report(model.transformer_config, preset, full, batch, rows * cols, text, resolution,
                  warmup, fwd_bwd, opt, loss, device, bf16, model.gradient_checkpointing)


def report(cfg: TransformerConfig, preset: str, full: int, batch: int, img: int, text: int,
           resolution: int, warmup: int, fwd_bwd: list[float], opt: list[float], loss: float,
           device: torch.device, bf16: bool, checkpointing: bool) -> dict[str, Any]:
    """The JSON record: timings, FLOPs from ``lens_model.flops`` at the depth run, MFU."""
    info = device_info(device)
    fwd = forward_flops(cfg, [img] * batch, [text] * batch)
    step_ms = [a + b for a, b in zip(fwd_bwd, opt, strict=True)]
    ms, ms_fb = statistics.median(step_ms), statistics.median(fwd_bwd)
    tflops = 3 * fwd / (ms / 1000) / 1e12
    tflops_hw = 4 * fwd / (ms / 1000) / 1e12
    tflops_fb = 3 * fwd / (ms_fb / 1000) / 1e12
    peak = info["peak_tflops"]
    mem = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return info | {
        "benchmark": "gpu_train",
        "smoke": device.type != "cuda",
        "preset": preset, "blocks": cfg.depth, "blocks_full": full,
        "params": param_count(cfg),
        "precision": "bf16 autocast, fp32 master weights" if bf16 else "fp32",
        "optimizer": "AdamW (fused)" if device.type == "cuda" else "AdamW",
        "grad_checkpointing": checkpointing, "sdpa_backend": "flash",
        "batch": batch, "resolution": resolution, "image_tokens": img, "text_tokens": text,
        "warmup_steps": warmup, "steps": len(step_ms),
        "ms_per_step": round(ms, 3), "ms_per_step_mean": round(statistics.mean(step_ms), 3),
        "ms_fwd_bwd": round(ms_fb, 3), "ms_optimizer": round(statistics.median(opt), 3),
        "forward_flops": fwd, "model_flops_per_step": 3 * fwd,
        "hardware_flops_per_step": 4 * fwd,
        "achieved_tflops": sig(tflops), "achieved_tflops_hardware": sig(tflops_hw),
        "mfu": None if peak is None else sig(tflops / peak),
        "hfu": None if peak is None else sig(tflops_hw / peak),
        "mfu_fwd_bwd": None if peak is None else sig(tflops_fb / peak),
        "peak_memory_gib": None if mem is None else round(mem, 2),
        "final_loss": round(loss, 5),
    }


class RandomPacked:
    """Endless batches as the loader deals them: windows of random buckets packed up to the
    budget by the loader's own packer (``pack_by_tokens``), bins in random order."""

    def __init__(self, buckets: list[Bucket], token_px: int, budget: int, window: int,
                 seed: int = 0) -> None:
        self.buckets = [b for b in buckets if b.tokens(token_px) <= budget]
        if not self.buckets:
            raise ValueError(f"loader.token_budget {budget} holds no bucket's image")
        self.token_px, self.budget, self.window, self.seed = token_px, budget, window, seed

    def __iter__(self) -> Iterator[Batch]:
        rng, px, index = random.Random(self.seed), self.token_px, 0
        while True:
            picks = [rng.choice(self.buckets) for _ in range(self.window)]
            bins = pack_by_tokens([b.tokens(px) for b in picks], self.budget)
            for rows in rng.sample(bins, len(bins)):
                row = [picks[i] for i in rows]
                yield Batch([b.name for b in row], [""] * len(row), [None] * len(row), [],
                            [(b.height // px, b.width // px) for b in row],
                            [b.name for b in row], 0, index)
                index += 1


def random_features(recipe: Recipe, buckets: list[Bucket], lm_hidden: int, text: int,
                    device: torch.device) -> dict[str, Any]:
    """A feature-cache entry per bucket (keyed by its name): random latents of its size and
    ``text`` tokens of hidden states, already on ``device`` as a cache would put them."""
    factor = recipe.buckets.token_px // get_preset(recipe.model.preset).patch_size
    g = torch.Generator(device=device).manual_seed(0)
    width = len(recipe.text_encoder.layers) * lm_hidden
    out = {}
    for b in buckets:
        latent = torch.randn(recipe.vae.latent_channels, b.height // factor, b.width // factor,
                             generator=g, device=device)
        hidden = torch.randn(text, width, generator=g, device=device)
        out[b.name] = (hidden, torch.ones(text, dtype=torch.bool, device=device), latent, None)
    return out


def plan_depth(recipe: Recipe, device: torch.device) -> int:
    """The most blocks whose memory plan on one rank fits the free GPU memory (all on CPU)."""
    from lens_model.memory_plan import plan

    full = get_preset(recipe.model.preset).depth
    if device.type != "cuda":
        return full
    free, _ = torch.cuda.mem_get_info(device)
    budget = int(0.9 * free) - 2 * GIB  # cuBLAS workspaces, allocator slack
    for depth in range(full, 0, -1):
        if plan(recipe, 1, 1, encoder=0, capacity=budget, depth=depth)["margin"] >= 0:
            return depth
    raise RuntimeError(f"not even one {recipe.name} block fits {free / GIB:.1f} GiB free")


def real_bench(recipe: Recipe, buckets: list[Bucket], lm_hidden: int, text: int, warmup: int,
               steps: int, device: torch.device) -> dict[str, Any]:
    """Time pretraining's own step (Trainer + LossFn) on random packed rows of ``buckets``."""
    from lens_model.denoiser import LensDenoiser
    from lens_model.text_encoder import TextConnector
    from lens_model.train.engine import Trainer
    from lens_model.train.pretrain import LossFn, train_config

    full = get_preset(recipe.model.preset).depth
    depth = plan_depth(recipe, device)
    log(f"building {recipe.name} with {depth}/{full} blocks on {device}, "
        f"{len(buckets)} bucket(s)")
    bf16 = recipe.pretrain.precision == "bf16"
    torch.manual_seed(recipe.seed)
    transformer = build_model(recipe.model.preset, depth, device,
                              torch.bfloat16 if bf16 else torch.float32,
                              in_channels=recipe.vae.latent_channels,
                              pooled_text=recipe.model.pooled_text)
    cfg = transformer.transformer_config
    with device:
        connector = TextConnector(n_layers=len(recipe.text_encoder.layers), hidden=lm_hidden,
                                  width=cfg.text_dim or cfg.width)
    features = random_features(recipe, buckets, lm_hidden, text, device)
    loss_fn = LossFn(recipe, features, None, None, cfg.patch_size)  # type: ignore[arg-type]
    trainer = Trainer(LensDenoiser(transformer, connector), loss_fn, train_config(recipe, None))
    batches = RandomPacked(buckets, recipe.buckets.token_px, recipe.loader.token_budget,
                           recipe.loader.shuffle_buffer)
    trainer.fit(batches, warmup)
    loss_fn.seen = {"img": [], "txt": []}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed: list[tuple[float, float, int, int, float]] = []

    def on_step(step: int, metrics: dict[str, float]) -> None:
        seen = loss_fn.seen
        fwd = forward_flops(cfg, seen["img"], seen["txt"])
        timed.append((metrics["step_s"], fwd, sum(seen["img"]), len(seen["img"]),
                      metrics["loss"]))
        loss_fn.seen = {"img": [], "txt": []}

    trainer.fit(batches, warmup + steps, on_step)
    info = device_info(device)
    peak = info["peak_tflops"]
    rates = [3 * fwd / s / 1e12 for s, fwd, *_ in timed]
    ms = statistics.median(1000 * t[0] for t in timed)
    mem = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    p = recipe.pretrain
    return info | {
        "recipe": recipe.name, "blocks": depth, "blocks_full": full, "params": param_count(cfg),
        "precision": p.precision, "zero_stage": p.zero_stage, "ema": p.ema_decay is not None,
        "ema_device": p.ema_device, "grad_checkpointing": p.grad_checkpointing,
        "attention": "flex (segment block mask)" if device.type == "cuda" else "segment mask",
        "buckets": len(buckets), "token_budget": recipe.loader.token_budget,
        "text_tokens_per_sample": text, "warmup_steps": warmup, "steps": len(timed),
        "ms_per_step": round(ms, 3),
        "samples_per_step": round(statistics.mean(t[3] for t in timed), 2),
        "image_tokens_per_step": round(statistics.mean(t[2] for t in timed), 1),
        "achieved_tflops": sig(statistics.median(rates)),
        "mfu": None if peak is None else sig(statistics.median(rates) / peak),
        "peak_memory_gib": None if mem is None else round(mem, 2),
        "final_loss": round(timed[-1][4], 5),
    }


def require_cuda() -> torch.device:
    """The GPU, or a clear exit naming the CPU smoke mode."""
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU, or pass --smoke for the CPU "
                         "check of the same code path")
    return torch.device("cuda")


def write_json(results: dict[str, Any], out: str | Path) -> None:
    """Print the results and write them to ``out`` (parents created)."""
    text = json.dumps(results, indent=2)
    print(text)
    atomic.write_text(out, text + "\n")


PARTS = ("real", "real_square", "ideal")


def run_parts(parts: list[str], smoke: bool, blocks: int | None, batch: int, steps: int,
              warmup: int) -> dict[str, Any]:
    """Each part in turn, memory freed between; a part that fails records its error."""
    if smoke:
        device, name, lm_hidden, text = torch.device("cpu"), "tiny", MINILM_HIDDEN, 16
    else:
        device, name, lm_hidden = require_cuda(), "lens-3.8b", GPT_OSS_20B["hidden_size"]
        text = 256
    recipe = load_recipe(name)
    buckets = buckets_for(recipe.buckets)
    side = max(b.width for b in buckets if b.width == b.height)  # 1024 (tiny: 40)
    square = [b for b in buckets if b.width == b.height == side]
    out: dict[str, Any] = {"benchmark": "gpu_train", "smoke": smoke}
    measures = {
        "real": lambda: real_bench(recipe, buckets, lm_hidden, text, warmup, steps, device),
        "real_square": lambda: real_bench(recipe, square, lm_hidden, text, warmup, steps,
                                          device),
        "ideal": lambda: train_bench(recipe.model.preset, blocks, batch, side,
                                     recipe.buckets.token_px, text, warmup, steps, device,
                                     not smoke),
    }
    for part in parts:
        run_part(out, part, device, measures[part])
    return out


def run_part(out: dict[str, Any], part: str, device: torch.device,
             measure: Callable[[], dict[str, Any]]) -> None:
    """``out[part] = measure()`` with its seconds, then memory freed; a part that fails records
    its error, so that the other parts still report."""
    start = time.perf_counter()
    try:
        out[part] = measure()
    except Exception as exc:  # noqa: BLE001 -- the other parts still report
        log(f"{part} failed: {type(exc).__name__}: {exc}")
        out[part] = {"error": f"{type(exc).__name__}: {exc}"}
    out[part]["seconds"] = round(time.perf_counter() - start, 1)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parse_parts(text: str, known: tuple[str, ...]) -> list[str]:
    """``--parts``: a comma-separated selection of ``known``."""
    parts = [p for p in text.split(",") if p]
    if not parts or set(parts) - set(known):
        raise SystemExit(f"--parts takes some of {', '.join(known)}, got {text!r}")
    return parts


def finish(out: dict[str, Any], parts: list[str], path: str | Path) -> None:
    """Write the results; exit non-zero naming the parts that failed."""
    write_json(out, path)
    failed = [p for p in parts if "error" in out[p]]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (see {path})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny recipe, fp32, 2 steps")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"some of {', '.join(PARTS)}")
    ap.add_argument("--blocks", default="auto", help="ideal: 'auto' or a block count (1..48)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (10; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (3; smoke 1)")
    ap.add_argument("--batch", type=int, default=1, help="ideal: samples a step")
    ap.add_argument("--out", default="bench/results/gpu_train.json")
    args = ap.parse_args()
    if args.blocks != "auto" and not args.blocks.isdigit():
        raise SystemExit(f"--blocks must be 'auto' or a positive integer, got {args.blocks!r}")
    parts = parse_parts(args.parts, PARTS)
    if args.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    steps = args.steps if args.steps is not None else 2 if args.smoke else 10
    warmup = args.warmup if args.warmup is not None else 1 if args.smoke else 3
    if steps < 1 or warmup < 0:
        raise SystemExit(f"need --steps >= 1 and --warmup >= 0, got {steps} and {warmup}")
    blocks = None if args.blocks == "auto" else int(args.blocks)
    finish(run_parts(parts, args.smoke, blocks, args.batch, steps, warmup), parts, args.out)


if __name__ == "__main__":
    main()
