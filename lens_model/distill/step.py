"""One Lens-Turbo update: ``ttur`` critic updates (fake score and discriminator), then one
student update, on a batch of real latents and their prompts' frozen-LM states.

The student is trained at each of its few steps the way DMD2 (arXiv 2405.14867, section 4.3)
trains a multi-step generator: a step k is drawn, the student runs its own Euler steps from
noise down to sigma_k without gradient ("backward simulation", so it learns from the inputs
it will meet when sampling), then one step with gradient gives its clean guess x0, which the
losses judge. Re-noising timesteps are uniform in [T_MIN, T_MAX], DMD2's range; the
CFG-augmentation term's in ``distill.ca_t_range``, above sigma_k with ``ca_above_step`` (see
``losses``). Sampling is deterministic Euler on the fixed schedule, the same integrator
``LensPipeline`` runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lens_model.denoiser import LensDenoiser
from lens_model.distill.losses import (
    Discriminator,
    denoised,
    discriminator_loss,
    dmd_loss,
    fake_score_loss,
    generator_gan_loss,
)
from lens_model.flow_matching import add_noise
from lens_model.recipe import DistillSection
from lens_model.rollout import pad_text

T_MIN, T_MAX = 0.02, 0.98


@dataclass
class DistillBatch:
    """Real latents of one size (B, C, h, w) and their prompts' unpadded states (T_i, L*D)."""

    latents: Tensor
    hidden: list[Tensor]


class Critic(nn.Module):
    """What the critic engine trains: the fake score and the discriminator head."""

    def __init__(self, fake: LensDenoiser, disc: Discriminator) -> None:
        super().__init__()
        self.fake, self.disc = fake, disc


class TeacherFeatures:
    """The frozen teacher's image tokens after block ``index``, caught by a forward hook: the
    discriminator's input. Gradients flow through the teacher to its input (the student's
    sample) but its weights stay frozen."""

    def __init__(self, teacher: LensDenoiser, index: int) -> None:
        blocks = teacher.transformer.blocks
        if not -len(blocks) <= index < len(blocks):
            raise ValueError(f"distill.disc_block {index}: the teacher has {len(blocks)} blocks; "
                             f"give an index in [-{len(blocks)}, {len(blocks) - 1}]")
        self.teacher, self.block = teacher, blocks[index]
        self.width = teacher.transformer.transformer_config.width

    def __call__(self, x_t: Tensor, states: Tensor, mask: Tensor, t: Tensor) -> Tensor:
        caught: list[Tensor] = []
        handle = self.block.register_forward_hook(lambda m, i, out: caught.append(out[0]))
        try:
            self.teacher.velocity(x_t, states, mask, t)
        finally:
            handle.remove()
        return caught[0]  # (B, N, width)


def _uniform(n: int, low: Tensor | float, high: float) -> Tensor:
    """Timesteps from the training RNG stream, which checkpoints carry."""
    return low + (high - low) * torch.rand(n)


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """``module``'s weights out of the graph for the duration (the student's adversarial loss
    must not train the discriminator)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(f)


class DistillStep:
    """The trainer's loss for the student engine; each call first updates the critic engine
    ``ttur`` times on the same batch with fresh noise. ``critic()`` returns that engine
    (``.module`` a :class:`Critic`, ``.backward``, ``.step``); it is built after this loss,
    by ``Trainer.add_companion``."""

    def __init__(self, cfg: DistillSection, teacher: LensDenoiser, sigmas: Tensor,
                 critic: Callable[[], Any]) -> None:
        if len(sigmas) != cfg.student_steps:
            raise ValueError(f"{len(sigmas)} student sigmas for distill.student_steps "
                             f"{cfg.student_steps}")
        self.cfg, self.teacher, self.sigmas, self.critic = cfg, teacher, sigmas.float(), critic
        self.features = TeacherFeatures(teacher, cfg.disc_block)
        self.parts: dict[str, float] = {}
        self.tokens: tuple[list[int], list[int]] = ([], [])  # image, text per sample: FLOPs

    def student_x0(self, student: nn.Module, states: Tensor, mask: Tensor, noise: Tensor,
                   k: int) -> tuple[Tensor, Tensor]:
        """Backward simulation to sigma_k, then the student's clean guess there (with grad when
        grad is enabled); returns (x0, t)."""
        b = noise.shape[0]
        x = noise
        with torch.no_grad():
            for i in range(k):
                t = self.sigmas[i].expand(b)
                nxt = self.sigmas[i + 1]
                x = x + (nxt - self.sigmas[i]) * student.velocity(x, states, mask, t).float()
        t = self.sigmas[k].expand(b)
        return denoised(x, student.velocity(x, states, mask, t).float(), t), t

    def _inputs(self, batch: DistillBatch, device: torch.device
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        states, mask = pad_text(batch.hidden)
        empty = states.new_zeros(states.shape)
        return (batch.latents.to(device).float(), states.to(device), mask.to(device),
                empty.to(device))

    def ca_timesteps(self, t_k: Tensor) -> Tensor:
        """The CA term's re-noising timesteps (B,): uniform in ``ca_t_range``, and above the
        student step's ``t_k`` with ``ca_above_step`` (at most the range's top)."""
        lo, hi = self.cfg.ca_t_range
        low = t_k.clamp(lo, hi) if self.cfg.ca_above_step else torch.full_like(t_k, lo)
        return _uniform(len(t_k), low, hi)

    def critic_update(self, student: nn.Module, batch: DistillBatch) -> dict[str, float]:
        """One fake-score and discriminator update on the student's current samples."""
        engine = self.critic()
        critic: Critic = engine.module
        device = next(critic.parameters()).device
        real, states, mask, _ = self._inputs(batch, device)
        b = real.shape[0]
        k = int(torch.randint(self.cfg.student_steps, ()))
        with torch.no_grad():
            x0, _ = self.student_x0(student, states, mask, torch.randn_like(real), k)
        t = _uniform(b, T_MIN, T_MAX).to(device)
        fake = fake_score_loss(lambda x, tt: critic.fake.velocity(x, states, mask, tt), x0, t)
        with torch.no_grad():
            t_d = _uniform(b, T_MIN, T_MAX).to(device)
            real_t = add_noise(real, torch.randn_like(real), t_d)
            fake_t = add_noise(x0, torch.randn_like(x0), t_d)
            perturbed = real_t + self.cfg.r1_perturb * torch.randn_like(real_t)
            feats = [self.features(x, states, mask, t_d) for x in (real_t, fake_t, perturbed)]
        logistic, r1 = discriminator_loss(critic.disc(feats[0]), critic.disc(feats[1]),
                                          critic.disc(feats[2]), self.cfg.r1_gamma)
        loss = fake + self.cfg.lambda_d * (logistic + r1)
        engine.backward(loss)
        engine.step()
        return {"critic/fake_loss": fake.item(), "critic/disc_loss": logistic.item(),
                "critic/r1": r1.item()}

    def __call__(self, engine: nn.Module, batch: DistillBatch) -> Tensor:
        """The student's loss: Decoupled-DMD plus lambda_g times the adversarial loss."""
        student = engine.module if hasattr(engine, "module") else engine
        critic_parts: dict[str, float] = {}
        for _ in range(self.cfg.ttur):
            critic_parts = self.critic_update(student, batch)
        cfg = self.cfg
        device = next(student.parameters()).device
        _, states, mask, empty = self._inputs(batch, device)
        b, _, h, w = batch.latents.shape
        patch = self.teacher.transformer.transformer_config.patch_size
        self.tokens = ([(h // patch) * (w // patch)] * b, [len(t) for t in batch.hidden])
        k = int(torch.randint(cfg.student_steps, ()))
        noise = torch.randn(batch.latents.shape).to(device)
        x0, t_k = self.student_x0(engine, states, mask, noise, k)
        critic: Critic = self.critic().module
        no_text = torch.zeros_like(mask)
        terms = dmd_loss(
            x0, lambda x, t: self.teacher.velocity(x, states, mask, t),
            lambda x, t: self.teacher.velocity(x, empty, no_text, t),
            lambda x, t: critic.fake.velocity(x, states, mask, t), cfg.guidance,
            t_ca=self.ca_timesteps(t_k.cpu()).to(device),
            t_dm=_uniform(b, T_MIN, T_MAX).to(device),
            ca_weight=cfg.ca_weight, dm_weight=cfg.dm_weight)
        t_g = _uniform(b, T_MIN, T_MAX).to(device)
        with _frozen(critic.disc):
            logits = critic.disc(self.features(add_noise(x0, torch.randn_like(x0), t_g),
                                               states, mask, t_g))
        gan = generator_gan_loss(logits)
        self.parts = {**critic_parts, "student/dmd": terms.loss.item(), "student/gan": gan.item(),
                      "student/ca_norm": terms.ca_norm, "student/dm_norm": terms.dm_norm,
                      "student/k": float(k)}
        return terms.loss + cfg.lambda_g * gan
