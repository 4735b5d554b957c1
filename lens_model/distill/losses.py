"""Lens-Turbo's losses: Decoupled-DMD plus a GAN branch on the frozen teacher's features.

Distribution matching distillation (DMD, arXiv 2311.18828; DMD2, arXiv 2405.14867) moves a
few-step student's samples x along ``x0_fake - x0_real``: the denoised guess of a "fake score"
model trained online on the student's own samples, minus the frozen teacher's. With the
teacher under CFG at scale w, x0_real = x0_c + (w - 1)(x0_c - x0_u), and the direction splits
(Decoupled DMD, arXiv 2511.22677) into

    DM = x0_fake - x0_c              distribution matching: the regulariser,
    CA = x0_c - x0_real              CFG augmentation: what makes few steps look guided
                                     ((w - 1)(x0_u - x0_c) without the rescale below).

Decoupled DMD re-noises each term at its own timestep: the caller draws CA's (by default above
the student step's own noise level, the coarse structure that step decides; ``step.py``) and
DM's over the whole range, a choice that paper motivates and the Lens paper leaves open. Each
term is divided by the teacher's mean absolute error on that sample, as DMD does, so that its
size does not depend on how noisy the re-noised input was. The guided teacher is the one the
sampler draws with: ``cfg_velocity``, whose per-latent-cell rescale to the conditional norm
makes CA = x0_c - x0_guided smaller than the plain (w - 1)(x0_u - x0_c) where guidance would
overshoot. Baking in the plain combination instead teaches the student a stronger guidance
than the teacher's own CFG samples show, and pushes it past them.

The GAN branch (DMD2's, with the discriminator reading the frozen teacher, as Lens does) is a
small head on one teacher block's image tokens; the logistic loss, and for the discriminator
an approximate R1 penalty: the squared change of its logit under a small perturbation of the
real input (the finite-difference form of ||grad D||^2 that needs no double backward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lens_model.flow_matching import add_noise, cfg_velocity

Velocity = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, C, h, w), t (B,)) -> v, text bound


def denoised(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """x0 = x_t - t v: the clean sample a velocity points at (x_t = (1 - t) x0 + t eps)."""
    return x_t - t.reshape(-1, *([1] * (x_t.ndim - 1))) * v


@dataclass
class DMDTerms:
    """The student's DMD loss and, for the event log, the two terms' sizes."""

    loss: Tensor
    ca_norm: float
    dm_norm: float


def _normalised(direction: Tensor, x: Tensor, x0_real: Tensor) -> Tensor:
    scale = (x - x0_real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return direction / scale.clamp(min=1e-6)


def dmd_loss(x: Tensor, real_cond: Velocity, real_uncond: Velocity, fake: Velocity,
             guidance: float, t_ca: Tensor, t_dm: Tensor, ca_weight: float = 1.0,
             dm_weight: float = 1.0, generator: torch.Generator | None = None) -> DMDTerms:
    """Decoupled-DMD on student samples ``x`` (B, C, h, w) that carry the student's graph.

    The loss is 1/2 ||x - sg(x - g)||^2 per sample, averaged, whose gradient in x is
    g = ca_weight CA + dm_weight DM (each term normalised); ``t_ca`` and ``t_dm`` (B,) are the
    two re-noising timesteps."""
    if guidance < 1:
        raise ValueError(f"distill.guidance {guidance}: CFG scale must be >= 1 (1 turns the "
                         f"CFG-augmentation term off)")
    with torch.no_grad():
        xd = x.detach().float()
        noise = torch.randn(xd.shape, generator=generator).to(xd)
        x_t = add_noise(xd, noise, t_ca)
        v_c = real_cond(x_t, t_ca).float()
        v_g = cfg_velocity(v_c, real_uncond(x_t, t_ca).float(), guidance, token_dim=1)
        x0_c = denoised(x_t, v_c, t_ca)
        ca = _normalised(x0_c - denoised(x_t, v_g, t_ca), xd, x0_c)
        noise = torch.randn(xd.shape, generator=generator).to(xd)
        x_t = add_noise(xd, noise, t_dm)
        x0_c = denoised(x_t, real_cond(x_t, t_dm).float(), t_dm)
        x0_f = denoised(x_t, fake(x_t, t_dm).float(), t_dm)
        dm = _normalised(x0_f - x0_c, xd, x0_c)
        grad = ca_weight * ca + dm_weight * dm
        target = xd - grad
    per_sample = 0.5 * (x.float() - target).square().flatten(1).sum(1)
    return DMDTerms(per_sample.mean() / x[0].numel(), float(ca.square().mean().sqrt()),
                    float(dm.square().mean().sqrt()))


def fake_score_loss(fake: Velocity, x: Tensor, t: Tensor,
                    generator: torch.Generator | None = None) -> Tensor:
    """Flow matching on the student's (detached) samples: what keeps the fake score the score
    of the student's distribution."""
    x = x.detach().float()
    noise = torch.randn(x.shape, generator=generator).to(x)
    v = fake(add_noise(x, noise, t), t).float()
    return (v - (noise - x)).square().mean()


class Discriminator(nn.Module):
    """Logits from one frozen-teacher block's image tokens (B, N, W): mean-pool, then an MLP.
    The teacher's joint attention has already mixed the prompt into those tokens."""

    def __init__(self, width: int, hidden: int = 256) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.SiLU(),
                                  nn.Linear(hidden, 1))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(tokens.float().mean(dim=1)).squeeze(-1)  # (B,)


def generator_gan_loss(fake_logits: Tensor) -> Tensor:
    """The student's non-saturating logistic loss: softplus(-D(G(z)))."""
    return F.softplus(-fake_logits).mean()


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, real_logits_perturbed: Tensor,
                       r1_gamma: float) -> tuple[Tensor, Tensor]:
    """The logistic loss softplus(-D(real)) + softplus(D(fake)) and the approximate R1 penalty
    gamma ||D(real) - D(real + perturbation)||^2; returns (logistic, r1)."""
    logistic = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    r1 = r1_gamma * (real_logits - real_logits_perturbed).square().mean()
    return logistic, r1


@torch.no_grad()
def ida_update(fake: nn.Module, student: nn.Module, mu: float) -> None:
    """IDA: the fake score's weights move toward the student's, phi <- (1 - mu) phi + mu theta,
    so the fake score starts each round near the distribution the student now draws.

    Under DeepSpeed's ZeRO 1-3 or bf16 the optimizer keeps fp32 master weights that it copies
    back over the module's after each step, so the master is what must move (and the module's
    copy with it, for the forwards before that step); every rank calls this (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    if not 0 <= mu <= 1:
        raise ValueError(f"distill.ida_mu {mu}: must be in [0, 1]")
    theta = dict(student.named_parameters())
    for name, phi in fake.named_parameters():
        if name not in theta or theta[name].shape != phi.shape:
            raise ValueError(f"IDA needs the fake score and the student to share shapes; "
                             f"{name} differs (give both the teacher's architecture)")
        target = safe_get_full_fp32_param(theta[name])
        target = theta[name].detach().float() if target is None else target
        master = safe_get_full_fp32_param(phi)
        if master is None:
            phi.lerp_(target.to(phi.dtype), mu)
            continue
        moved = master.lerp(target.to(master), mu)
        safe_set_full_fp32_param(phi, moved)
        phi.copy_(moved.to(phi.dtype))
