"""Analytic parameter, FLOP and memory accounting for ``LensTransformer2DModel``.

FLOPs are matmul FLOPs: 2 x multiply-accumulates. They cover
- every linear layer of both streams, the adaLN modulations included;
- the input, timestep and output layers;
- attention's QK^T and AV.
Attention is counted per sample over its own joint [image; text] sequence, since a packed
batch is block-diagonal. The dense masked kernel in ``transformer.py`` also spends FLOPs on
the masked-out pairs, and those are not counted here. Norms, RoPE, softmax and the other
elementwise ops are left out (well under 1% at these widths). So is the frozen text encoder.

The adaLN modulations run once per sample, not once per token: they read only the
timestep. The last block's text stream is pre-only: K, V and a 2-way modulation, and only
image tokens query in that block (see ``transformer.py``).
"""

from __future__ import annotations

from lens_model.config import TIME_FREQ_DIM, TransformerConfig, get_preset


def _lin(fan_in: int, fan_out: int) -> int:
    """Parameters of a ``nn.Linear`` with bias."""
    return fan_in * fan_out + fan_out


def param_count(cfg: TransformerConfig, adaln: bool = True) -> int:
    """Parameters of the model; ``adaln=False`` leaves out every modulation linear."""
    w, h, p = cfg.width, cfg.mlp_hidden, cfg.patch_dim
    qk = 2 * cfg.head_dim if cfg.qk_norm else 0
    attn_mlp = _lin(w, 3 * w) + qk + _lin(w, w) + _lin(w, 2 * h) + _lin(h, w)
    full_streams = 2 * cfg.depth - 1  # every image stream, every text stream but the last
    body = full_streams * attn_mlp + _lin(w, 2 * w) + qk // 2  # + last text stream: K, V, K-norm
    embed = _lin(p, w) + (0 if cfg.text_dim == w else _lin(cfg.text_dim, w))
    embed += _lin(TIME_FREQ_DIM, w) + _lin(w, w) + _lin(w, p)
    embed += _lin(w, w) if cfg.pooled_text else 0
    mods = full_streams * _lin(w, 6 * w) + _lin(w, 2 * w) + _lin(w, 2 * w)  # + last text, final
    return body + embed + (mods if adaln else 0)


def sample_flops(cfg: TransformerConfig, img_tokens: int, txt_tokens: int) -> dict[str, float]:
    """Forward FLOPs of one sample, split into linear, adaln and attention."""
    if img_tokens < 0 or txt_tokens < 0:
        raise ValueError(f"token counts must be >= 0, got {img_tokens} image, {txt_tokens} text")
    w, h, p, d = cfg.width, cfg.mlp_hidden, cfg.patch_dim, cfg.depth
    n, t = img_tokens, txt_tokens
    per_token = 2 * (4 * w * w + 3 * w * h)  # QKV + out + SwiGLU (gate, up, down)
    linear = d * n * per_token + (d - 1) * t * per_token + t * 2 * 2 * w * w  # last text: KV
    linear += 2 * n * p * w + 2 * n * w * p  # patch embedding, output projection
    linear += 0 if cfg.text_dim == w else 2 * t * cfg.text_dim * w
    linear += 2 * (TIME_FREQ_DIM * w + w * w)  # timestep MLP, once per sample
    linear += 2 * (t * w + w * w) if cfg.pooled_text else 0  # text mean (a matmul), Linear
    adaln = 2 * w * (6 * w * (2 * d - 1) + 2 * w + 2 * w)  # per stream, last text, final
    # QK^T and AV over all heads; in the last block only the n image tokens query
    attention = (d - 1) * 4 * (n + t) ** 2 * w + 4 * n * (n + t) * w
    return {"linear": float(linear), "adaln": float(adaln), "attention": float(attention)}


def forward_flops(cfg: TransformerConfig, img_tokens: list[int], txt_tokens: list[int]) -> float:
    """Matmul FLOPs of one forward over samples with these image and text token counts."""
    if len(img_tokens) != len(txt_tokens):
        raise ValueError(f"{len(img_tokens)} image token counts but {len(txt_tokens)} text "
                         f"token counts; pass one of each per sample")
    return sum(sum(sample_flops(cfg, n, t).values())
               for n, t in zip(img_tokens, txt_tokens, strict=True))


def train_step_flops(cfg: TransformerConfig, img_tokens: list[int], txt_tokens: list[int],
                     recompute: bool = False) -> float:
    """Forward + backward (2x forward); ``recompute`` adds the checkpointed forward again."""
    return (4.0 if recompute else 3.0) * forward_flops(cfg, img_tokens, txt_tokens)


def memory_bytes(cfg: TransformerConfig, weights_dtype_bytes: int = 2,
                 grads_bytes: int | None = None, adam_bytes: int | None = None) -> dict[str, int]:
    """Bytes of weights, grads and Adam state for training (activations not included).

    Defaults follow bf16 mixed precision: bf16 weights and grads, plus fp32 Adam m and v and
    an fp32 master copy (12 bytes a parameter). With fp32 weights there is no master copy
    (8 bytes).
    """
    grads_bytes = weights_dtype_bytes if grads_bytes is None else grads_bytes
    if adam_bytes is None:
        adam_bytes = 8 if weights_dtype_bytes >= 4 else 12
    n = param_count(cfg)
    out = {"params": n, "weights": n * weights_dtype_bytes, "grads": n * grads_bytes,
           "adam": n * adam_bytes}
    out["total"] = out["weights"] + out["grads"] + out["adam"]
    return out


def info(preset: str, width: int, height: int, text_tokens: int = 256,
         token_px: int = 16) -> dict:
    """Size, FLOPs and training memory of ``preset`` for one width x height image (JSON-ready)."""
    cfg = get_preset(preset)
    if width <= 0 or height <= 0 or width % token_px or height % token_px:
        raise ValueError(f"image size {width}x{height} must be positive multiples of token_px "
                         f"{token_px} (VAE factor x patch size)")
    if token_px % cfg.patch_size:
        raise ValueError(f"token_px {token_px} is not a multiple of the patch size "
                         f"{cfg.patch_size}")
    n = (width // token_px) * (height // token_px)
    parts = sample_flops(cfg, n, text_tokens)
    fwd = sum(parts.values())
    return {
        "preset": preset,
        "config": cfg.to_dict(),
        "params": param_count(cfg),
        "params_without_adaln": param_count(cfg, adaln=False),
        "resolution": f"{width}x{height}",
        "image_tokens": n,
        "text_tokens": text_tokens,
        "forward_flops": fwd,
        "forward_flops_by_kind": parts,
        "train_step_flops": 3 * fwd,
        "train_step_flops_checkpointed": 4 * fwd,
        "memory_bytes": memory_bytes(cfg),
    }
