"""What pretraining trains: the backbone plus the language encoder's trainable connector.

The frozen language model and the VAE stay outside, so DeepSpeed only sees trainable weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lens_model.attention import AttentionPlan
from lens_model.flow_matching import euler_sample, shift_mu
from lens_model.text_encoder import TextConnector
from lens_model.transformer import LensTransformer2DModel, UnpackedLayout


class LensDenoiser(nn.Module):
    """Velocity of packed or unpacked latents given frozen-LM hidden states and a timestep."""

    def __init__(self, transformer: LensTransformer2DModel, connector: TextConnector) -> None:
        super().__init__()
        self.transformer, self.connector = transformer, connector

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def forward(self, img_tokens: Tensor, txt_hidden: Tensor, timestep: Tensor,
                img_segment_ids: Tensor, txt_segment_ids: Tensor, img_position_ids: Tensor,
                txt_position_ids: Tensor, attention: AttentionPlan | None = None) -> Tensor:
        """Packed rows: img (B, Li, 4C), txt_hidden (B, Lt, L*D) -> velocity (B, Li, 4C);
        ``attention``: the batch's plan (``transformer.plan``), built where the batch is."""
        txt = self.connector(txt_hidden, txt_segment_ids >= 0)  # (B, Lt, width)
        return self.transformer(img_tokens, txt, timestep, img_segment_ids, txt_segment_ids,
                                img_position_ids, txt_position_ids, attention)

    def velocity(self, latents: Tensor, txt_hidden: Tensor, txt_mask: Tensor,
                 timestep: Tensor, layout: UnpackedLayout | None = None) -> Tensor:
        """Unpacked: latents (B, C, h, w), txt_hidden (B, T, L*D), mask (B, T), t (B,)."""
        txt = self.connector(txt_hidden, txt_mask)
        return self.transformer.forward_unpacked(latents, txt, txt_mask, timestep, layout)


@torch.no_grad()
def sample_latents(denoiser: LensDenoiser, cond: tuple[Tensor, Tensor],
                   uncond: tuple[Tensor, Tensor], shape: tuple[int, int, int, int], steps: int,
                   guidance: float | None, generator: torch.Generator,
                   mu_rule: dict[str, float] | None = None) -> Tensor:
    """Euler flow-matching sampling with CFG (cond and uncond as one batch); (B, C, h, w)."""
    b, _, h, w = shape
    device = next(denoiser.parameters()).device
    noise = torch.randn(shape, generator=generator).to(device)  # CPU draws: same on any device
    tokens = (h // denoiser.transformer.transformer_config.patch_size) * (
        w // denoiser.transformer.transformer_config.patch_size)
    mu = float(shift_mu(tokens, **(mu_rule or {})))
    if guidance is None:
        hidden, mask = cond
    else:
        t_len = max(cond[0].shape[1], uncond[0].shape[1])
        hidden = torch.cat([_pad(cond[0], t_len), _pad(uncond[0], t_len)])
        mask = torch.cat([_pad(cond[1], t_len), _pad(uncond[1], t_len)])
    hidden, mask = hidden.to(device), mask.to(device)
    layout = denoiser.transformer.unpacked_layout((len(mask), *shape[1:]), mask)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        return denoiser.velocity(x, hidden, mask, t, layout)

    return euler_sample(velocity, noise, steps, mu, guidance, token_dim=1)


def _pad(x: Tensor, length: int) -> Tensor:
    """Right-pad dim 1 with zeros (False for masks) to ``length``."""
    extra = length - x.shape[1]
    if extra == 0:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], extra, *x.shape[2:]))], dim=1)
