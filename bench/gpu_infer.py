"""Inference latency of lens-3.8b on one GPU (a lent H100), bf16, random weights: one backbone
forward, and ``LensPipeline`` as users call it.

    python -m bench.gpu_infer [--parts forward,pipeline] [--iters 20] [--warmup 5] \\
        [--images 3] [--compile] [--out bench/results/gpu_infer.json]
    python -m bench.gpu_infer --smoke --out /tmp/gpu_infer_smoke.json   # CPU, tiny, seconds

``forward``: one forward of the 48-block backbone (bf16, eval, no grad) at 1024^2: 4096 image
tokens plus 256 text tokens per sample, at batch 1 (a guidance-free step, as Lens-Turbo
runs) and batch 2 (cond + uncond, one CFG step). One segment per row and no padding, so no
mask: SDPA's flash kernel is forced. Timed with CUDA events around each of ``--iters``
back-to-back forwards after ``--warmup`` untimed ones; the median is reported beside the
reference numbers in ``REFERENCE``.

``pipeline``: ``LensPipeline(prompt, size="1024x1024")``, 20 Euler steps with CFG 5.0, from a
109-word prompt to decoded pixels: the language model (GPT-OSS-20B's architecture, 24 layers
and 32 experts, built from its config with random weights in bf16: no weights can be had
here), the connector, the backbone and FLUX.2's VAE decoder (diffusers' AutoencoderKLFlux2
defaults). The tokenizer is all-MiniLM-L6-v2's, the one on hand, so the prompt's token count
is near, not equal to, GPT-OSS's. Wall time per image after one untimed image, synchronized.

``--compile`` adds the same measurements with every backbone block under ``torch.compile``
(regional: per block, so the model's input checks stay eager), compile time reported apart.
``--smoke`` runs the same code on CPU with the tiny preset in fp32, MiniLM as the language
model and a small FLUX.2-shaped VAE, at 32x32, and writes the same keys.
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
    GPT_OSS_20B,
    StepTimer,
    build_model,
    built_on,
    device_info,
    finish,
    log,
    parse_parts,
    require_cuda,
    run_part,
    sig,
    synthetic_inputs,
    token_grid,
)
from lens_model.flops import forward_flops, param_count
from lens_model.recipe import Recipe, load_recipe
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
    "target_20_step_cfg_s": 1.5,
    "paper_turbo_4_step_s": 0.84,
    "source": "paper_*: Lens paper, arXiv 2605.21573; ms: one H100, diffusers SD3 joint blocks, "
              "48 x 1536",
}
# 109 words, the mean length of Lens's training captions
PROMPT = (
    "A quiet harbour town at golden hour seen from a low stone pier: weathered fishing boats "
    "painted red, teal and cream rest on calm water that mirrors the warm sky, gulls circle "
    "above a lighthouse with a striped white and crimson tower, and narrow houses with "
    "terracotta roofs climb the hill behind the quay. In the foreground an old fisherman in a "
    "yellow raincoat coils a rope beside wooden crates of silver fish, while a small brown "
    "dog watches him. Soft long shadows, light haze over the distant hills, fine detail on "
    "the wet stones, photographed with a 35 mm lens, natural colours, shallow depth of "
    "field, nostalgic mood.")


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


def build_pipeline(recipe: Recipe, device: torch.device, dtype: torch.dtype,
                   lm_config: dict[str, Any] | None = None) -> Any:
    """``LensPipeline`` of ``recipe``'s shapes with random weights on ``device``: its
    language model the real MiniLM for a "minilm" recipe, else GPT-OSS-20B's config with
    ``lm_config``'s fields over it; the MiniLM tokenizer; a FLUX.2-shaped VAE (the tiny one
    for a trained-VAE recipe)."""
    from diffusers import AutoencoderKLFlux2
    from transformers import AutoModel, AutoTokenizer, GptOssConfig

    from lens_model.buckets import buckets_for
    from lens_model.data.tokens import minilm_dir
    from lens_model.pipeline import LensPipeline, make_scheduler
    from lens_model.text_encoder import TextConnector
    from lens_model.vae import SemanticVAE

    te = recipe.text_encoder
    torch.manual_seed(0)
    transformer = build_model(recipe.model.preset, None, device, dtype,
                              in_channels=recipe.vae.latent_channels,
                              pooled_text=recipe.model.pooled_text)
    cfg = transformer.transformer_config
    with built_on(device, dtype):
        if te.path == "minilm":
            lm = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True,
                                           use_safetensors=True, dtype=dtype)
        else:
            from transformers import GptOssModel

            lm = GptOssModel(GptOssConfig(**{**GPT_OSS_20B, **(lm_config or {})}))
        vae = (AutoencoderKLFlux2() if recipe.vae.source == "pretrained" else
               SemanticVAE.tiny(recipe.vae.latent_channels, recipe.vae.downsample).model)
        connector = TextConnector(n_layers=len(te.layers), hidden=lm.config.hidden_size,
                                  width=cfg.text_dim or cfg.width)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    areas = sorted({b.width * b.height for b in buckets_for(recipe.buckets)})
    pipe = LensPipeline(transformer=transformer.eval(), vae=vae.eval(), text_encoder=lm.eval(),
                        tokenizer=tokenizer, connector=connector.eval(),
                        scheduler=make_scheduler(recipe.pretrain.mu_rule()),
                        layers=list(te.layers), max_length=te.max_length, trained_areas=areas)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def time_images(pipe: Any, size: str, images: int, device: torch.device) -> dict[str, Any]:
    """Seconds per 20-step CFG image after one untimed image (compile and caches)."""
    def one(seed: int) -> float:
        start = time.perf_counter()
        pipe(PROMPT, size=size, num_inference_steps=20, guidance_scale=5.0, seed=seed,
             output_type="pt")
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = one(0)
    secs = [one(1 + i) for i in range(images)]
    log(f"{size}: {statistics.median(secs):.3f} s per 20-step CFG image")
    return {"s_per_image": round(statistics.median(secs), 4), "s_min": round(min(secs), 4),
            "first_image_s": round(first, 3), "images": images}


def pipeline_bench(recipe: Recipe, size: str, images: int, device: torch.device,
                   compile_blocks: bool, lm_config: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """``LensPipeline`` at ``size``: 20-step CFG images, text encoding and decode included."""
    if images < 1:
        raise ValueError(f"--images must be >= 1, got {images}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    log(f"building the {recipe.name} pipeline on {device}")
    pipe = build_pipeline(recipe, device, dtype, lm_config)
    with torch.no_grad():
        tokens = len(pipe.tokenizer(PROMPT)["input_ids"])
        eager = time_images(pipe, size, images, device)
        compiled = None
        if compile_blocks:
            for block in pipe.transformer.blocks:
                block.compile(dynamic=False)
            compiled = time_images(pipe, size, images, device)
    on_gpu = device.type == "cuda"
    best = min(x["s_per_image"] for x in (eager, compiled) if x)
    return device_info(device) | {
        "recipe": recipe.name, "size": size, "steps": 20, "guidance_scale": 5.0,
        "dtype": str(dtype).split(".")[-1], "prompt_words": len(PROMPT.split()),
        "prompt_tokens": tokens, "lm_params": sum(p.numel() for p in
                                                  pipe.text_encoder.parameters()),
        "eager": eager, "compiled": compiled,
        "within_target": best <= REFERENCE["target_20_step_cfg_s"] if on_gpu else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if on_gpu else None,
    }


PARTS = ("forward", "pipeline")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset, fp32")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"some of {', '.join(PARTS)}")
    ap.add_argument("--iters", type=int, default=None, help="timed forwards (20; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed forwards (5; smoke 1)")
    ap.add_argument("--images", type=int, default=None, help="timed images (3; smoke 1)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd blocks")
    ap.add_argument("--out", default="bench/results/gpu_infer.json")
    args = ap.parse_args()
    parts = parse_parts(args.parts, PARTS)
    if args.smoke:
        device, name, res, px, text, size = torch.device("cpu"), "tiny", 64, 8, 16, "32x32"
    else:
        device, name, res, px, text, size = require_cuda(), "lens-3.8b", 1024, 16, 256, \
            "1024x1024"
    iters = args.iters if args.iters is not None else 2 if args.smoke else 20
    warmup = args.warmup if args.warmup is not None else 1 if args.smoke else 5
    images = args.images if args.images is not None else 1 if args.smoke else 3
    recipe = load_recipe(name)
    out: dict[str, Any] = {"benchmark": "gpu_infer", "smoke": args.smoke}
    measures = {
        "forward": lambda: infer_bench(recipe.model.preset, res, px, text, warmup, iters,
                                       device, args.compile),
        "pipeline": lambda: pipeline_bench(recipe, size, images, device, args.compile),
    }
    for part in parts:
        run_part(out, part, device, measures[part])
    finish(out, parts, args.out)


if __name__ == "__main__":
    main()
