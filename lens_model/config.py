"""Backbone presets as typed configs: one-line factories in a registry (DiT style).

| preset | depth x width | heads (dim) | SwiGLU | latent ch | RoPE axes | params |
|---|---|---|---|---|---|---|
| tiny | 4 x 128 | 4 (32) | 512 | 8 | (8, 12, 12) | 2.70e6 |
| toy | 14 x 1536 | 24 (64) | 4096 | 32 | (8, 28, 28) | 1.16e9 |
| lens-3.8b | 48 x 1536 | 24 (64) | 4096 | 32 | (8, 28, 28) | 4.05e9 |

- ``lens-3.8b`` is the Lens paper's backbone (arXiv 2605.21573): 4.054e9 parameters,
  2.699e9 without the adaLN modulations, and 4.054e9 / 2^30 = 3.78 ("3.8B" in binary units).
- ``toy`` is Lens-Toy's 1.2B ablation backbone. The paper gives only its size, so it keeps
  lens-3.8b's block and takes the depth that lands nearest 1.2e9: 14 blocks (13 give 1.08e9,
  15 give 1.25e9).
- ``tiny`` runs on a CPU in tests and the demo. Its 4 x 128 shape is the one of those tried
  that trained best per minute, with 4 heads of dim 32 split over RoPE axes (8, 12, 12):
  even dims, and the two spatial axes equal as in the paper. Its 8 latent channels suit the
  tiny recipe's 4x VAE (token_px 8 = 4x VAE x 2x2 patchify).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

TIME_FREQ_DIM = 256  # sinusoid dims of the timestep embedding


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a ``LensTransformer2DModel``; validated on creation."""

    depth: int
    width: int
    heads: int
    mlp_hidden: int
    in_channels: int = 32  # VAE latent channels (FLUX.2's VAE: 32)
    patch_size: int = 2
    text_dim: int | None = None  # width of incoming text features; None means ``width``
    axes_dims: tuple[int, int, int] = (8, 28, 28)  # RoPE dims over (text/frame, row, col)
    rope_theta: float = 10000.0
    qk_norm: bool = True
    eps: float = 1e-6
    # Not in the paper: each sample's mean text token, through a Linear, joins the timestep
    # embedding that every adaLN reads (SD3 and FLUX add a pooled CLIP vector the same way).
    pooled_text: bool = False

    def __post_init__(self) -> None:
        if self.text_dim is None:
            object.__setattr__(self, "text_dim", self.width)
        object.__setattr__(self, "axes_dims", tuple(int(d) for d in self.axes_dims))
        for name in ("depth", "width", "heads", "mlp_hidden", "in_channels", "patch_size",
                     "text_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}; "
                             f"pick heads that divide the width")
        head_dim = self.width // self.heads
        if len(self.axes_dims) != 3:
            raise ValueError(f"axes_dims {self.axes_dims} must have 3 entries: "
                             f"(text/frame index, row, col)")
        if sum(self.axes_dims) != head_dim:
            raise ValueError(f"axes_dims {self.axes_dims} sum to {sum(self.axes_dims)} but the "
                             f"head dim is {head_dim} (width / heads); make them sum to it")
        if any(d <= 0 or d % 2 for d in self.axes_dims):
            raise ValueError(f"axes_dims {self.axes_dims} must be positive and even "
                             f"(RoPE rotates pairs of dims)")
        if self.rope_theta <= 0 or self.eps <= 0:
            raise ValueError(f"rope_theta ({self.rope_theta}) and eps ({self.eps}) must be > 0")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def patch_dim(self) -> int:
        """Channels of one image token: patch_size^2 x latent channels."""
        return self.patch_size * self.patch_size * self.in_channels

    def to_dict(self) -> dict:
        """Plain kwargs (for ``LensTransformer2DModel(**cfg.to_dict())`` and JSON)."""
        return dataclasses.asdict(self)


def tiny(**kw) -> TransformerConfig:
    return TransformerConfig(**{"depth": 4, "width": 128, "heads": 4, "mlp_hidden": 512,
                                "in_channels": 8, "axes_dims": (8, 12, 12), **kw})


def toy(**kw) -> TransformerConfig:
    return TransformerConfig(**{"depth": 14, "width": 1536, "heads": 24, "mlp_hidden": 4096,
                                "in_channels": 32, **kw})


def lens_3_8b(**kw) -> TransformerConfig:
    return TransformerConfig(**{"depth": 48, "width": 1536, "heads": 24, "mlp_hidden": 4096,
                                "in_channels": 32, **kw})


PRESETS: dict[str, Callable[..., TransformerConfig]] = {
    "tiny": tiny,
    "toy": toy,
    "lens-3.8b": lens_3_8b,
}


def get_preset(name: str, **overrides) -> TransformerConfig:
    """The preset ``name`` with ``overrides`` applied (``text_dim`` follows ``width`` if unset)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown TransformerConfig field(s) {unknown}; "
                         f"allowed: {', '.join(sorted(fields))}")
    return PRESETS[name](**overrides)
