"""Per-forward inference latency of the lens-3.8b backbone on one GPU (a lent H100), bf16.

    python -m bench.gpu_infer [--iters 20] [--warmup 5] [--compile] \\
        [--out bench/results/gpu_infer.json]
    python -m bench.gpu_infer --smoke --out /tmp/gpu_infer_smoke.json   # CPU, tiny, seconds

One forward of the 48-block backbone (random weights, bf16, eval, no grad) at 1024^2: 4096
image tokens plus 256 text tokens per sample, at batch 1 (a guidance-free step, as
Lens-Turbo runs) and batch 2 (cond + uncond, one CFG step). One segment per row and no
padding, so no mask: SDPA's flash kernel is forced. Timed with CUDA events around each of
``--iters`` back-to-back forwards after ``--warmup`` untimed ones; the median is reported
beside the reference numbers in ``REFERENCE``: the target at batch 1, a Lens-shaped MMDiT built
from diffusers' SD3 joint blocks timed on one H100, and the Lens paper's seconds per image
(arXiv 2605.21573). ``--compile`` adds the same measurement with every block
under ``torch.compile`` (per block, so the model's input checks stay eager), compile time
reported apart. ``--smoke`` runs the same code on CPU with the tiny preset in fp32 at 64x64
(8 px a token, 16 text tokens), batch 1 and 2, and writes the same keys.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch.nn.attention import sdpa_kernel

from bench.gpu_train import (
    FLASH,
    StepTimer,
    build_model,
    device_info,
    log,
    require_cuda,
    sig,
    synthetic_inputs,
    token_grid,
    write_json,
)
from lens_model.flops import forward_flops, param_count
from lens_model.transformer import LensTransformer2DModel

BATCHES = (1, 2)
# Not measured by this script. paper_*: the Lens paper's seconds for one 1024^2 image on one H100
# (arXiv 2605.21573); target_ms_batch_1: the latency target; the other milliseconds come from
# one H100 (bf16, random weights, eager).
REFERENCE = {
    "target_ms_batch_1": 40.0,
    "diffusers_sd3_mmdit_ms": {"batch_1": 71.7, "batch_2": 132.0},
    "floor_ms_at_measured_matmul_rate": 22.0,
    "flux2_vae_decode_ms": 91.6,
    "paper_20_step_cfg_s": 3.15,
    "paper_turbo_4_step_s": 0.84,
    "source": "paper_*: Lens paper, arXiv 2605.21573; ms: one H100, diffusers SD3 joint blocks, "
              "48 x 1536",
}


def time_forwards(model: LensTransformer2DModel, inputs: dict[str, torch.Tensor], warmup: int,
                  iters: int) -> tuple[list[float], float]:
    """(ms per timed forward, seconds of the first warm-up call, compile included)."""
    device = inputs["img"].device
    x = inputs
    args = (x["img"], x["txt"], x["t"], x["img_seg"], x["txt_seg"], x["img_pos"], x["txt_pos"])
    with torch.no_grad(), sdpa_kernel(FLASH):
        first = time.perf_counter()
        model(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        first_s = time.perf_counter() - first
        for _ in range(max(0, warmup - 1)):
            model(*args)
        timer = StepTimer(device)
        timer.mark()
        for _ in range(iters):
            model(*args)
            timer.mark()
    return timer.ms(), first_s


def measure(model: LensTransformer2DModel, rows: int, cols: int, text: int, warmup: int,
            iters: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Latency and achieved TFLOP/s of one forward at each batch size."""
    cfg = model.transformer_config
    peak = device_info(device)["peak_tflops"]
    out = {}
    for b in BATCHES:
        inputs = synthetic_inputs(cfg, b, rows, cols, text, device, dtype)
        ms, first_s = time_forwards(model, inputs, warmup, iters)
        med = statistics.median(ms)
        tflops = forward_flops(cfg, [rows * cols] * b, [text] * b) / (med / 1000) / 1e12
        out[f"batch_{b}"] = {
            "ms_per_forward": round(med, 3), "ms_mean": round(statistics.mean(ms), 3),
            "ms_min": round(min(ms), 3), "first_call_s": round(first_s, 3),
            "achieved_tflops": sig(tflops),
            "fraction_of_peak": None if peak is None else sig(tflops / peak)}
        log(f"batch {b}: {med:.2f} ms per forward ({tflops:.4g} TFLOP/s)")
    return out


def infer_bench(preset: str, resolution: int, token_px: int, text: int, warmup: int,
                iters: int, device: torch.device, compile_blocks: bool) -> dict[str, Any]:
    """Eager (and optionally compiled) forward latency at batch 1 and 2, with the references."""
    if iters < 1 or warmup < 1 or text < 1:
        raise ValueError(f"need --iters >= 1, --warmup >= 1, --text-tokens >= 1; got {iters}, "
                         f"{warmup}, {text}")
    rows, cols = token_grid(resolution, token_px)
    log(f"building {preset} on {device}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(preset, None, device, dtype).eval().requires_grad_(False)
    cfg = model.transformer_config
    eager = measure(model, rows, cols, text, warmup, iters, device, dtype)
    compiled = None
    if compile_blocks:
        log("compiling each block with torch.compile")
        for block in model.blocks:
            block.compile(dynamic=False)  # one static graph per batch size
        compiled = measure(model, rows, cols, text, warmup, iters, device, dtype)
    on_gpu = device.type == "cuda"
    b1, b2 = eager["batch_1"]["ms_per_forward"], eager["batch_2"]["ms_per_forward"]
    decode = REFERENCE["flux2_vae_decode_ms"]
    return device_info(device) | {
        "benchmark": "gpu_infer", "smoke": not on_gpu, "preset": preset,
        "blocks": cfg.depth, "params": param_count(cfg), "dtype": str(dtype).split(".")[-1],
        "sdpa_backend": "flash", "resolution": resolution, "image_tokens": rows * cols,
        "text_tokens": text, "warmup": warmup, "iters": iters,
        "eager": eager, "compiled": compiled, "reference": REFERENCE,
        "within_target": b1 <= REFERENCE["target_ms_batch_1"] if on_gpu else None,
        "speedup_vs_diffusers_sd3_batch_1":
            round(REFERENCE["diffusers_sd3_mmdit_ms"]["batch_1"] / b1, 3) if on_gpu else None,
        # backbone forwards measured here plus REFERENCE's FLUX.2 VAE decode (not measured by
        # this script); the text encoder is not counted
        "estimate_20_step_cfg_s": round((20 * b2 + decode) / 1000, 3) if on_gpu else None,
        "estimate_turbo_4_step_s": round((4 * b1 + decode) / 1000, 3) if on_gpu else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset, fp32, 64x64")
    ap.add_argument("--iters", type=int, default=None, help="timed forwards (20; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed forwards (5; smoke 1)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd blocks")
    ap.add_argument("--out", default="bench/results/gpu_infer.json")
    args = ap.parse_args()
    if args.smoke:
        device, preset, res, px, text = torch.device("cpu"), "tiny", 64, 8, 16
        iters = 2 if args.iters is None else args.iters
        warmup = 1 if args.warmup is None else args.warmup
    else:
        device, preset, res, px, text = require_cuda(), "lens-3.8b", 1024, 16, 256
        iters = 20 if args.iters is None else args.iters
        warmup = 5 if args.warmup is None else args.warmup
    write_json(infer_bench(preset, res, px, text, warmup, iters, device, args.compile), args.out)


if __name__ == "__main__":
    main()
