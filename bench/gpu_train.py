"""Training-step MFU of the lens-3.8b backbone on one GPU (a lent H100), bf16, random weights.

    python -m bench.gpu_train [--blocks auto|N] [--steps 10] [--warmup 3] \\
        [--out bench/results/gpu_train.json]
    python -m bench.gpu_train --smoke --out /tmp/gpu_train_smoke.json   # CPU, tiny, seconds

One step = forward + backward + AdamW on one sample at 1024^2 (4096 image tokens) plus 256
text tokens. Each row holds one segment with no padding, so the model passes no mask and
attention runs through SDPA's flash kernel, which is forced (``sdpa_kernel``) so that a
silent fallback cannot flatter or spoil the number. Activation checkpointing is on.

Precision: fp32 master weights with ``torch.autocast(bfloat16)`` (PyTorch AMP), and fused
AdamW on the fp32 weights: 16 bytes a parameter for weights, grads and Adam state, about
65 GB at 48 blocks. ``--blocks auto`` takes all 48 blocks if that estimate plus activations
fits the free GPU memory, else the most that fit, and falls back by a quarter on an
out-of-memory error. FLOPs are counted by ``lens_model.flops`` for exactly the model run
(depth = blocks used).

Timing: CUDA events around each step (forward+backward, then optimizer), warm-up steps
excluded, one synchronize at the end. Reported: median ms/step, achieved TFLOP/s, MFU
(model FLOPs = 3 x forward) and HFU (4 x forward, the checkpointed forward counted again)
against the device's peak bf16 rate from ``lens_model.train.ledger.PEAK_TFLOPS`` (989 for
H100), the device name and the torch version. ``--smoke`` runs the same code on CPU with the
tiny preset in fp32 (64x64 pixels at 8 px a token, 32 text tokens, 1 warm-up + 2 steps) and
writes the same keys, with MFU null.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from lens_model import atomic
from lens_model.config import TransformerConfig, get_preset
from lens_model.flops import forward_flops, memory_bytes, param_count
from lens_model.flow_matching import add_noise, velocity_loss
from lens_model.train.ledger import peak_tflops_for
from lens_model.transformer import (
    LensTransformer2DModel,
    image_position_ids,
    text_position_ids,
)

GIB = 2**30


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


def build_model(preset: str, blocks: int | None, device: torch.device,
                dtype: torch.dtype = torch.float32) -> LensTransformer2DModel:
    """The preset (at ``blocks`` depth if given), initialised directly on ``device`` in ``dtype``.

    Built in place, with no detour through host memory or an fp32 copy (16 GB at full size).
    """
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            return LensTransformer2DModel.from_preset(
                preset, **({} if blocks is None else {"depth": blocks}))
    finally:
        torch.set_default_dtype(before)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset, fp32, 2 steps")
    ap.add_argument("--blocks", default="auto", help="'auto' or a block count (1..48)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (10; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (3; smoke 1)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default="bench/results/gpu_train.json")
    args = ap.parse_args()
    if args.blocks != "auto" and not args.blocks.isdigit():
        raise SystemExit(f"--blocks must be 'auto' or a positive integer, got {args.blocks!r}")
    blocks = None if args.blocks == "auto" else int(args.blocks)
    if args.smoke:
        device, preset, res, px, text, bf16 = torch.device("cpu"), "tiny", 64, 8, 32, False
        steps = 2 if args.steps is None else args.steps
        warmup = 1 if args.warmup is None else args.warmup
    else:
        device, preset, res, px, text, bf16 = require_cuda(), "lens-3.8b", 1024, 16, 256, True
        steps = 10 if args.steps is None else args.steps
        warmup = 3 if args.warmup is None else args.warmup
    write_json(train_bench(preset, blocks, args.batch, res, px, text, warmup, steps, device,
                           bf16), args.out)


if __name__ == "__main__":
    main()
