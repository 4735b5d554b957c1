"""``LensTransformer2DModel``: the Lens paper's dual-stream MMDiT backbone (arXiv 2605.21573).

Each block holds two streams, image and text. Each stream has its own
- 6-way adaLN modulation: shift, scale and gate for attention and for the MLP, taken from
  the timestep embedding;
- RMSNorm pre-norms (no affine: adaLN supplies scale and shift) and per-head QK-RMSNorm;
- QKV and output projections, and a SwiGLU MLP.
The streams share one joint attention over [image; text] tokens, with 3-axis RoPE on q and k.
adaLN-zero: every modulation and the output projection start at zero, so each block starts
as the identity and the model's output at init is exactly zero.

Choices where the paper is silent:
- Positions (t, row, col). Image tokens take (0, row, col), as ``packing.pack_tokens``
  writes them. Text token j of a sample (counting only real tokens, from 0) takes
  (j + 1, 0, 0). Starting at 1 keeps the first text token off the image's top-left
  position (0, 0, 0).
- The last block's text stream is "pre-only", as in SD3, but leaner. Its text output is never
  read, so it keeps only what the image tokens read: a 2-way (shift, scale) modulation, K and
  V, and the K-norm. Text queries, the output projection and the MLP would be weights that
  never get a gradient, which DDP rejects. In that block only the image tokens query.
- Timesteps t in [0, 1] are embedded as sinusoids of 1000 t (256 dims), then pass through
  Linear -> SiLU -> Linear. The text input is used as is when ``text_dim == width`` (the
  language encoder's own linear already maps to the width); otherwise one Linear maps it.
- All linears carry a bias. Weights use Xavier-uniform init, the timestep MLP N(0, 0.02).

An option the paper does not have, off in its presets: ``pooled_text`` adds a Linear of each
sample's mean text token (after ``txt_in``; masked and padding tokens left out, so an empty
prompt pools to zero) to the timestep embedding that every adaLN reads.

The packed forward is the trainer's API. It takes several samples per row, told apart by
segment ids (-1 is padding). A token attends only to tokens of its own segment, and padding
attends only to itself (``attention.py``: no dense mask outside the reference kernel). Each
token is modulated by its segment's timestep, broadcast from (B, S, W) inside one op, never
kept per token. Every sample therefore computes exactly what it would compute alone;
``flops.py`` counts the per-sample (block-diagonal) work.

After ``enable_gradient_checkpointing()``, each block is recomputed in backward whenever
autograd is recording (diffusers' convention), so in train and eval mode alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from lens_model.attention import AttentionPlan, Kernel, attend, plan_attention
from lens_model.config import TIME_FREQ_DIM, TransformerConfig, get_preset

TIME_SCALE = 1000.0  # t in [0, 1] is embedded as 1000 t


def patchify(latent: Tensor, patch_size: int = 2) -> Tensor:
    """(..., C, H, W) latent -> (..., H/p * W/p, p*p*C) tokens, row-major, channels (c, ph, pw)."""
    *lead, c, h, w = latent.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latent of size {h}x{w} is not divisible by patch size {p}; "
                         f"crop or pad it to a multiple of {p}")
    x = latent.reshape(-1, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (N, h/p, w/p, c, p, p)
    return x.reshape(*lead, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: Tensor, channels: int, height: int, width: int,
               patch_size: int = 2) -> Tensor:
    """(..., H/p * W/p, p*p*C) tokens -> (..., C, H, W) latent; the inverse of ``patchify``."""
    p = patch_size
    *lead, n, d = tokens.shape
    if height % p or width % p or n != (height // p) * (width // p) or d != channels * p * p:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not make a {channels}x"
                         f"{height}x{width} latent at patch size {p}")
    x = tokens.reshape(-1, height // p, width // p, channels, p, p)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (N, c, h/p, p, w/p, p)
    return x.reshape(*lead, channels, height, width)


def image_position_ids(rows: int, cols: int, device: torch.device | None = None) -> Tensor:
    """(rows*cols, 3) long positions (0, row, col), row-major (as ``packing.pack_tokens``)."""
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    return torch.stack([torch.zeros_like(r), r, c], dim=-1)


def text_position_ids(mask: Tensor) -> Tensor:
    """(..., T) bool mask of real tokens -> (..., T, 3) positions (j + 1, 0, 0), j over real."""
    j = mask.long().cumsum(-1)  # the k-th real token gets k (1-based); padding is never attended
    zeros = torch.zeros_like(j)
    return torch.stack([j, zeros, zeros], dim=-1)


def pack_text(features: list[Tensor], budget: int) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate per-sample (T_i, D) text features into (budget, D) with segment/position ids.

    The text counterpart of ``packing.pack_tokens``: segment ids are the sample index (-1 for
    padding) and positions are (j + 1, 0, 0) per sample.
    """
    total = sum(f.shape[0] for f in features)
    if total > budget:
        raise ValueError(f"{len(features)} captions hold {total} text tokens, over the text "
                         f"budget of {budget}; raise the budget or pack fewer samples")
    dim = features[0].shape[-1] if features else 0
    dtype = features[0].dtype if features else torch.float32
    dev = features[0].device if features else None
    tokens = torch.zeros(budget, dim, dtype=dtype, device=dev)
    segment_ids = torch.full((budget,), -1, dtype=torch.long, device=dev)
    position_ids = torch.zeros(budget, 3, dtype=torch.long, device=dev)
    start = 0
    for i, f in enumerate(features):
        if f.ndim != 2 or f.shape[1] != dim:
            raise ValueError(f"caption {i}: features of shape {tuple(f.shape)}; "
                             f"expected (T, {dim})")
        end = start + f.shape[0]
        tokens[start:end] = f
        segment_ids[start:end] = i
        position_ids[start:end, 0] = torch.arange(1, f.shape[0] + 1, device=dev)
        start = end
    return tokens, segment_ids, position_ids


def rope_angles(position_ids: Tensor, axes_dims: tuple[int, ...],
                theta: float) -> tuple[Tensor, Tensor]:
    """(B, L, 3) positions -> cos, sin of shape (B, 1, L, D/2), axis by axis (float32)."""
    parts = []
    for axis, dim in enumerate(axes_dims):
        freqs = theta ** (-torch.arange(0, dim, 2, device=position_ids.device,
                                        dtype=torch.float32) / dim)  # (dim/2,)
        parts.append(position_ids[..., axis, None].float() * freqs)  # (B, L, dim/2)
    angles = torch.cat(parts, dim=-1)[:, None]  # (B, 1, L, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[2i], x[2i+1]) of (B, H, L, D) by its angle; float32 inside."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, H, L, D/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def timestep_embedding(t: Tensor, dim: int = TIME_FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """(...,) t in [0, 1] -> (..., dim) sinusoids [cos | sin] of 1000 t."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device,
                                                            dtype=torch.float32) / half)
    args = (t.float() * TIME_SCALE)[..., None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


def _spread(mod: Tensor, index: Tensor) -> Tensor:
    """(B, S, W) per-segment values -> (B, L, W) per token, a temporary of one op."""
    return mod.gather(1, index[..., None].expand(-1, -1, mod.shape[-1]))


def _segment_sums(values: Tensor, index: Tensor, segments: int) -> Tensor:
    """(B, L, W) per token -> (B, S, W) summed per segment: the gradient of :func:`_spread`."""
    out = values.new_zeros(values.shape[0], segments, values.shape[-1])
    return out.scatter_add_(1, index[..., None].expand_as(values), values)


class _Modulate(torch.autograd.Function):
    """x * (1 + scale[seg]) + shift[seg] for per-segment (B, S, W) shift and scale. Backward
    keeps x, the (B, L) index and the (B, S, W) scale: the per-token (B, L, W) copies exist
    only inside one op, never among what autograd keeps (6 W a token a stream in all)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, shift: Tensor, scale: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(x, scale, index)
        return torch.addcmul(_spread(shift, index), x, 1 + _spread(scale, index))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        x, scale, index = ctx.saved_tensors
        s = scale.shape[1]
        return (grad * (1 + _spread(scale, index)), _segment_sums(grad, index, s),
                _segment_sums(grad * x, index, s), None)


class _Gate(torch.autograd.Function):
    """x + gate[seg] * h for a per-segment (B, S, W) gate; keeps h, the index and the gate."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, gate: Tensor, h: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(gate, h, index)
        return torch.addcmul(x, _spread(gate, index), h)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        gate, h, index = ctx.saved_tensors
        return (grad, _segment_sums(grad * h, index, gate.shape[1]),
                grad * _spread(gate, index), None)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor, index: Tensor | None) -> Tensor:
    """adaLN: ``index`` None: one segment a row, (B, 1, W) shift and scale broadcast."""
    if index is None:
        return x * (1 + scale) + shift
    return _Modulate.apply(x, shift, scale, index)


def _gated(x: Tensor, gate: Tensor, h: Tensor, index: Tensor | None) -> Tensor:
    """The gated residual x + gate * h, per segment as :func:`_modulate`."""
    if index is None:
        return x + gate * h
    return _Gate.apply(x, gate, h, index)


def segment_mean(tokens: Tensor, segment_ids: Tensor, segments: int) -> Tensor:
    """(B, L, W) tokens, (B, L) segment ids (-1: padding) -> (B, S, W) per-segment means;
    a segment with no tokens gets 0."""
    onehot = segment_ids.unsqueeze(-1) == torch.arange(segments, device=segment_ids.device)
    onehot = onehot.to(tokens.dtype)  # (B, L, S)
    count = onehot.sum(dim=1).unsqueeze(-1).clamp(min=1)  # (B, S, 1)
    return onehot.transpose(1, 2) @ tokens / count


@dataclass(frozen=True)
class UnpackedLayout:
    """What ``forward_unpacked`` feeds the packed forward besides the tokens."""

    img_seg: Tensor
    txt_seg: Tensor
    img_pos: Tensor
    txt_pos: Tensor
    attention: AttentionPlan


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up fused in one matmul."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Stream(nn.Module):
    """One stream's weights within a block (image or text); pre-only streams give keys only."""

    def __init__(self, cfg: TransformerConfig, pre_only: bool = False) -> None:
        super().__init__()
        w = cfg.width
        self.heads = cfg.heads
        self.pre_only = pre_only
        self.mod = nn.Linear(w, (2 if pre_only else 6) * w)  # adaLN from the timestep
        self.norm1 = nn.RMSNorm(w, eps=cfg.eps, elementwise_affine=False)
        self.qkv = nn.Linear(w, (2 if pre_only else 3) * w)  # pre-only: k and v
        qk = (lambda: nn.RMSNorm(cfg.head_dim, eps=cfg.eps)) if cfg.qk_norm else nn.Identity
        self.k_norm = qk()
        if not pre_only:
            self.q_norm = qk()
            self.out = nn.Linear(w, w)
            self.norm2 = nn.RMSNorm(w, eps=cfg.eps, elementwise_affine=False)
            self.mlp = SwiGLU(w, cfg.mlp_hidden)

    def modulation(self, temb: Tensor) -> list[Tensor]:
        """Per-segment (shift, scale[, gate, shift2, scale2, gate2]), each (B, S, W)."""
        return list(self.mod(temb).chunk(2 if self.pre_only else 6, dim=-1))

    def qkv_heads(self, x: Tensor, shift: Tensor, scale: Tensor,
                  index: Tensor | None) -> tuple[Tensor | None, Tensor, Tensor]:
        """(B, L, W) -> q, k, v of shape (B, H, L, D), q and k RMS-normed; q None if pre-only."""
        h = _modulate(self.norm1(x), shift, scale, index)
        parts = self.qkv(h).unflatten(-1, (-1, self.heads, x.shape[-1] // self.heads))
        parts = parts.permute(2, 0, 3, 1, 4)  # (2 or 3, B, H, L, D)
        if self.pre_only:
            return None, self.k_norm(parts[0]), parts[1]
        return self.q_norm(parts[0]), self.k_norm(parts[1]), parts[2]

    def finish(self, x: Tensor, attn: Tensor, mod: list[Tensor],
               index: Tensor | None) -> Tensor:
        """Gated residual attention output, then the gated residual MLP; (B, L, W)."""
        _, _, gate1, shift2, scale2, gate2 = mod
        x = _gated(x, gate1, self.out(attn), index)
        return _gated(x, gate2, self.mlp(_modulate(self.norm2(x), shift2, scale2, index)), index)


class JointBlock(nn.Module):
    """Image and text streams sharing one attention over [image; text]."""

    def __init__(self, cfg: TransformerConfig, last: bool = False) -> None:
        super().__init__()
        self.img = Stream(cfg)
        self.txt = Stream(cfg, pre_only=last)

    def forward(self, x: Tensor, c: Tensor, temb: Tensor, img_index: Tensor | None,
                txt_index: Tensor | None, cos: Tensor, sin: Tensor,
                plan: AttentionPlan) -> tuple[Tensor, Tensor | None]:
        """x (B, Li, W), c (B, Lt, W), temb (B, S, W) -> updated x, c (None after the last)."""
        mod_x, mod_c = self.img.modulation(temb), self.txt.modulation(temb)
        qi, ki, vi = self.img.qkv_heads(x, mod_x[0], mod_x[1], img_index)
        qt, kt, vt = self.txt.qkv_heads(c, mod_c[0], mod_c[1], txt_index)
        q = qi if qt is None else torch.cat([qi, qt], dim=2)  # (B, H, Lq, D), Lq = Li [+ Lt]
        lq = q.shape[2]
        q = apply_rope(q, cos[:, :, :lq], sin[:, :, :lq])
        k = apply_rope(torch.cat([ki, kt], dim=2), cos, sin)  # (B, H, Li+Lt, D)
        v = torch.cat([vi, vt], dim=2)
        attn = attend(q, k, v, plan).transpose(1, 2).flatten(2)  # (B, Lq, W)
        attn_x, attn_c = attn[:, :x.shape[1]], attn[:, x.shape[1]:]
        x = self.img.finish(x, attn_x, mod_x, img_index)
        c = None if self.txt.pre_only else self.txt.finish(c, attn_c, mod_c, txt_index)
        return x, c


class LensTransformer2DModel(ModelMixin, ConfigMixin):
    """The Lens MMDiT: patch tokens + text features + timestep -> velocity per patch token."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, depth: int = 4, width: int = 128, heads: int = 4, mlp_hidden: int = 512,
                 in_channels: int = 8, patch_size: int = 2, text_dim: int | None = None,
                 axes_dims: tuple[int, int, int] = (8, 12, 12), rope_theta: float = 10000.0,
                 qk_norm: bool = True, eps: float = 1e-6, pooled_text: bool = False) -> None:
        super().__init__()
        self.attention_kernel: Kernel = "auto"  # attention.plan_attention's choice of kernel
        cfg = TransformerConfig(depth=depth, width=width, heads=heads, mlp_hidden=mlp_hidden,
                                in_channels=in_channels, patch_size=patch_size,
                                text_dim=text_dim, axes_dims=tuple(axes_dims),
                                rope_theta=rope_theta, qk_norm=qk_norm, eps=eps,
                                pooled_text=pooled_text)
        self.transformer_config = cfg
        self.gradient_checkpointing = False
        self.img_in = nn.Linear(cfg.patch_dim, width)
        self.txt_in = nn.Identity() if cfg.text_dim == width else nn.Linear(cfg.text_dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, width), nn.SiLU(),
                                      nn.Linear(width, width))
        self.text_pool = nn.Linear(width, width) if pooled_text else None
        self.blocks = nn.ModuleList(JointBlock(cfg, last=i == depth - 1) for i in range(depth))
        self.final_mod = nn.Linear(width, 2 * width)
        self.norm_out = nn.RMSNorm(width, eps=eps, elementwise_affine=False)
        self.proj_out = nn.Linear(width, cfg.patch_dim)
        self._init_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> LensTransformer2DModel:
        """A freshly initialised model of preset ``name`` (``config.PRESETS``)."""
        return cls(**get_preset(name, **overrides).to_dict())

    def _init_weights(self) -> None:
        """Xavier linears, N(0, 0.02) timestep MLP, then zero every modulation and the output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.time_mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        zeroed = [self.final_mod, self.proj_out]
        zeroed += [s.mod for b in self.blocks for s in (b.img, b.txt)]
        for m in zeroed:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, img_tokens: Tensor, txt_tokens: Tensor, timestep: Tensor,
                img_segment_ids: Tensor, txt_segment_ids: Tensor, img_position_ids: Tensor,
                txt_position_ids: Tensor, attention: AttentionPlan | None = None) -> Tensor:
        """Packed forward: (B, Li, p*p*C) image tokens -> (B, Li, p*p*C) velocity.

        txt_tokens (B, Lt, text_dim); timestep (B, S) in [0, 1], one per segment;
        segment ids (B, Li) / (B, Lt) long, -1 for padding; position ids (B, L, 3).
        ``attention``: the batch's plan from ``self.plan(...)``, built where the batch is (a
        sampler builds it once for all its steps); then nothing here reads a value back to
        the host. Without one, the values are checked and a plan is built here.
        """
        self._check_shapes(img_tokens, txt_tokens, timestep, img_segment_ids, txt_segment_ids,
                           img_position_ids, txt_position_ids)
        if attention is None:
            attention = self.plan(img_segment_ids, txt_segment_ids, timestep)
        x = self.img_in(img_tokens)  # (B, Li, W)
        c = self.txt_in(txt_tokens)  # (B, Lt, W)
        temb = self.time_mlp(timestep_embedding(timestep).to(x.dtype))  # (B, S, W)
        if self.text_pool is not None:
            temb = temb + self.text_pool(segment_mean(c, txt_segment_ids, timestep.shape[1]))
        temb = F.silu(temb)  # every adaLN linear reads silu(temb)
        one_segment = timestep.shape[1] == 1
        cfg = self.transformer_config
        cos, sin = rope_angles(torch.cat([img_position_ids, txt_position_ids], dim=1),
                               cfg.axes_dims, cfg.rope_theta)  # (B, 1, L, D/2) each
        # Padding (-1) borrows segment 0's modulation; it only ever attends to itself.
        img_index = None if one_segment else img_segment_ids.clamp(min=0)
        txt_index = None if one_segment else txt_segment_ids.clamp(min=0)
        for block in self.blocks:
            args = (x, c, temb, img_index, txt_index, cos, sin, attention)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x, c = self._gradient_checkpointing_func(block, *args)
            else:
                x, c = block(*args)
        shift, scale = self.final_mod(temb).chunk(2, dim=-1)
        return self.proj_out(_modulate(self.norm_out(x), shift, scale, img_index))

    def unpacked_layout(self, latent_shape: tuple[int, ...], text_mask: Tensor) -> UnpackedLayout:
        """Ids, positions and attention plan of one sample a row of ``latent_shape``
        (B, C, H, W) beside text under ``text_mask`` (B, T): what every step of a sampler
        shares, built once."""
        b, _, h, w = latent_shape
        p, dev = self.transformer_config.patch_size, text_mask.device
        img_seg = torch.zeros(b, (h // p) * (w // p), dtype=torch.long, device=dev)
        txt_seg = torch.where(text_mask.bool(), 0, -1)
        return UnpackedLayout(img_seg, txt_seg,
                              image_position_ids(h // p, w // p, dev).expand(b, -1, -1),
                              text_position_ids(text_mask.bool()), self.plan(img_seg, txt_seg))

    def forward_unpacked(self, latents: Tensor, text: Tensor, text_mask: Tensor,
                         timestep: Tensor, layout: UnpackedLayout | None = None) -> Tensor:
        """(B, C, H, W) latents, (B, T, text_dim) text, (B, T) bool mask, (B,) t -> (B, C, H, W);
        ``layout``: ``unpacked_layout``'s, shared by a sampler's steps."""
        if latents.ndim != 4 or text.ndim != 3 or text_mask.shape != text.shape[:2]:
            raise ValueError(f"forward_unpacked wants latents (B, C, H, W), text (B, T, D) and "
                             f"text_mask (B, T); got {tuple(latents.shape)}, "
                             f"{tuple(text.shape)}, {tuple(text_mask.shape)}")
        b, ch, h, w = latents.shape
        p = self.transformer_config.patch_size
        if layout is None:
            layout = self.unpacked_layout(tuple(latents.shape), text_mask)
        out = self.forward(patchify(latents, p), text, timestep.reshape(b, 1), layout.img_seg,
                           layout.txt_seg, layout.img_pos, layout.txt_pos, layout.attention)
        return unpatchify(out, ch, h, w, p)

    def plan(self, img_segment_ids: Tensor, txt_segment_ids: Tensor,
             timestep: Tensor | None = None) -> AttentionPlan:
        """Check a batch's segment ids (and timesteps, where given) and plan its attention:
        once per batch, where it is built, so ``forward`` reads nothing back to the host."""
        img_seg, txt_seg, t = img_segment_ids, txt_segment_ids, timestep
        if img_seg.is_floating_point() or txt_seg.is_floating_point():
            raise ValueError("segment ids must be integer tensors (long), -1 for padding")
        meta = img_seg.is_meta or txt_seg.is_meta or (t is not None and t.is_meta)
        if not meta:  # meta tensors (FLOP counting) hold no values
            top = max(int(img_seg.max()) if img_seg.numel() else -1,
                      int(txt_seg.max()) if txt_seg.numel() else -1)
            if t is not None and top >= t.shape[1]:
                raise ValueError(f"segment id {top} has no timestep: timestep has {t.shape[1]} "
                                 f"per row; pass one timestep per segment")
            if t is not None and t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
                raise ValueError(f"timestep must lie in [0, 1], got [{float(t.min()):.4g}, "
                                 f"{float(t.max()):.4g}]; pass t, not 1000 t")
        return plan_attention(img_seg, txt_seg, self.attention_kernel)

    def _check_shapes(self, img: Tensor, txt: Tensor, t: Tensor, img_seg: Tensor,
                      txt_seg: Tensor, img_pos: Tensor, txt_pos: Tensor) -> None:
        """Shape checks with the offending argument named (shapes only: no host sync)."""
        cfg = self.transformer_config
        b = img.shape[0]
        expect = {"img_tokens": (img, (b, img.shape[1], cfg.patch_dim)),
                  "txt_tokens": (txt, (b, txt.shape[1] if txt.ndim == 3 else -1, cfg.text_dim)),
                  "timestep": (t, (b, t.shape[-1])),
                  "img_segment_ids": (img_seg, (b, img.shape[1])),
                  "txt_segment_ids": (txt_seg, (b, txt.shape[1] if txt.ndim == 3 else -1)),
                  "img_position_ids": (img_pos, (b, img.shape[1], 3)),
                  "txt_position_ids": (txt_pos, (b, txt.shape[1] if txt.ndim == 3 else -1, 3))}
        for name, (tensor, shape) in expect.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} "
                                 f"(B={b}, patch dim {cfg.patch_dim}, text_dim {cfg.text_dim})")
