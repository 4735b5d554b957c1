"""Per-rank training memory of a recipe on NODES x GPUS (``lens model info RECIPE --plan``).

Bytes per rank, for pretraining:
- weights: every parameter in the training dtype (bf16 2 bytes, fp32 4) on every rank; the
  recipes train ZeRO 0-2, which keep whole weights.
- grads: the same dtype, partitioned over the ranks from ZeRO-2 on.
- optimizer: Adam's m and v in fp32, plus an fp32 master copy under bf16; partitioned from
  ZeRO-1 on.
- ema: the fp32 shadow of ``lens_model/train/ema.py``, whole on every rank; none on the GPU
  with ``pretrain.ema_device: cpu``.
- activations: what autograd keeps for one micro-batch: ``loader.token_budget`` image tokens
  and, at most, ``text_encoder.max_length`` text tokens for each image of the smallest bucket.
- text_encoder: its weights in ``text_encoder.dtype`` when ``pretrain.features`` is
  ``online``.

The activation counts are the tensors ``transformer.py`` saves for backward, per token and in
elements of the training dtype (``tests/test_memory_plan.py`` checks them against autograd's
saved tensors on small presets):
- a block's full stream (image, or text before the last block): 18 W + 4 H. Before attention:
  its input, the normed and modulated input, qkv (3 W), the q- and k-norms' normalised
  values; the joint attention: roped q and k, v, the output and its flattened copy; after it:
  the projection's output, the residual, its normed and modulated copies and the MLP output,
  plus the SwiGLU's gate and up (2 H), their product and silu (2 H).
- the last block's text stream (keys and values only): 8 W.
- packed rows with several samples keep no more: each segment's adaLN values are broadcast
  to its tokens inside one op (``transformer._Modulate``, ``_Gate``). Gathered per token and
  kept, as before, they cost 8 W more a token in a full stream, 3 W in the last text stream
  and W outside the blocks (docs/gpu.md gives what that is at 1024^2).
- outside the blocks, per image token: the input projection's input (the patch dim), the
  final norm's input, its modulated copy and the output projection's input (3 W).
With activation checkpointing a block keeps only its inputs (W per token), and backward
recomputes one block at a time: that block's full count, plus the gradients flowing through
it (2 W per token).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lens_model.buckets import buckets_for
from lens_model.config import TransformerConfig, get_preset
from lens_model.flops import param_count
from lens_model.recipe import Recipe

FULL_W, FULL_H, LAST_TEXT_W, OUT_W, GRAD_W = 18, 4, 8, 3, 2
GPU_BYTES = {"A100": 80 * 2**30, "H100": 80 * 2**30, "H800": 80 * 2**30}


@dataclass(frozen=True)
class Tokens:
    """Tokens of one micro-batch on one rank."""

    image: int
    text: int
    samples: int


def _block(cfg: TransformerConfig, tokens: Tokens) -> tuple[int, int]:
    """Elements one block before the last and the last block keep, without checkpointing."""
    w, h, n, t = cfg.width, cfg.mlp_hidden, tokens.image, tokens.text
    stream = FULL_W * w + FULL_H * h
    return stream * (n + t), stream * n + LAST_TEXT_W * w * t


def saved_bytes(cfg: TransformerConfig, tokens: Tokens, checkpointing: bool,
                dtype_bytes: int) -> int:
    """Bytes the forward keeps for backward: every block's tensors, or under checkpointing
    only each block's inputs; and RoPE's cos and sin (fp32, head_dim a token, shared)."""
    w, n, t = cfg.width, tokens.image, tokens.text
    full, last = _block(cfg, tokens)
    blocks = cfg.depth * w * (n + t) if checkpointing else (cfg.depth - 1) * full + last
    head = (OUT_W * w + cfg.patch_dim) * n
    return (blocks + head) * dtype_bytes + 4 * cfg.head_dim * (n + t)


def activation_bytes(cfg: TransformerConfig, tokens: Tokens, checkpointing: bool,
                     dtype_bytes: int) -> int:
    """Peak bytes of activations: what the forward keeps, plus under checkpointing the one
    block backward recomputes at a time and the gradients flowing through it."""
    saved = saved_bytes(cfg, tokens, checkpointing, dtype_bytes)
    if not checkpointing:
        return saved
    grads = GRAD_W * cfg.width * (tokens.image + tokens.text)
    return saved + (_block(cfg, tokens)[0] + grads) * dtype_bytes


def micro_batch(recipe: Recipe) -> Tokens:
    """The worst case a rank packs: the token budget filled with the smallest bucket's images,
    each with a full-length caption."""
    px = recipe.buckets.token_px
    smallest = min((b.width // px) * (b.height // px) for b in buckets_for(recipe.buckets))
    samples = max(1, recipe.loader.token_budget // smallest)
    return Tokens(image=samples * smallest, text=samples * recipe.text_encoder.max_length,
                  samples=samples)


def encoder_params(path: str) -> int:
    """Parameters of the language model at ``path`` (a local folder, or "minilm"), counted
    from its config on the meta device: nothing is loaded."""
    import torch
    from transformers import AutoConfig, AutoModel

    from lens_model.data.tokens import MINILM, minilm_dir

    folder = minilm_dir() if path == MINILM else Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"text_encoder.path {path!r} is not a local model folder with a "
                         f"config.json; download it there, or pass --encoder-params N")
    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    return sum(p.numel() for p in model.parameters())


def plan(recipe: Recipe, nodes: int, gpus: int, encoder: int | None = None,
         capacity: int | None = None, depth: int | None = None) -> dict[str, Any]:
    """Bytes per rank of each part for ``recipe``'s pretraining on ``nodes`` x ``gpus``, the
    total, the GPU's capacity (``launch.gpu_type``) and the margin left (negative: no fit);
    ``depth`` plans the model cut to that many blocks (a one-GPU benchmark of a big preset)."""
    if nodes < 1 or gpus < 1:
        raise ValueError(f"--plan {nodes}x{gpus}: give NODESxGPUS, both at least 1")
    p, world = recipe.pretrain, nodes * gpus
    cfg = get_preset(recipe.model.preset, in_channels=recipe.vae.latent_channels,
                     pooled_text=recipe.model.pooled_text,
                     **({} if depth is None else {"depth": depth}))
    n = param_count(cfg)
    dtype = 2 if p.precision == "bf16" else 4
    optimizer = n * (12 if p.precision == "bf16" else 8)
    tokens = micro_batch(recipe)
    online = p.features == "online"
    if online and encoder is None:
        encoder = encoder_params(recipe.text_encoder.path)
    parts = {
        "weights": n * dtype,
        "grads": n * dtype // (world if p.zero_stage >= 2 else 1),
        "optimizer": optimizer // (world if p.zero_stage >= 1 else 1),
        "ema": 0 if p.ema_device == "cpu" else n * 4,
        "activations": activation_bytes(cfg, tokens, p.grad_checkpointing, dtype),
        "text_encoder": (2 if recipe.text_encoder.dtype == "bf16" else 4) * encoder
        if online and encoder else 0,
    }
    total = sum(parts.values())
    if capacity is None:
        gpu = recipe.launch.gpu_type
        if gpu not in GPU_BYTES:
            raise ValueError(f"launch.gpu_type {gpu!r} has no known memory; set an 80 GB type "
                             f"({', '.join(GPU_BYTES)}) or pass --gpu-gib")
        capacity = GPU_BYTES[gpu]
    return {"recipe": recipe.name, "nodes": nodes, "gpus_per_node": gpus, "params": n,
            "zero_stage": p.zero_stage, "precision": p.precision,
            "grad_checkpointing": p.grad_checkpointing, "features": p.features,
            "micro_batch": asdict(tokens), "bytes": parts, "total": total,
            "capacity": capacity, "margin": capacity - total}
