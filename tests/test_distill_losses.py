"""Lens-Turbo's losses against closed forms: velocities built to point at known clean images."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lens_model.distill.losses import (
    Discriminator,
    discriminator_loss,
    dmd_loss,
    fake_score_loss,
    generator_gan_loss,
    ida_update,
)
from lens_model.flow_matching import add_noise, cfg_velocity


def _pointing_at(x0: Tensor):
    """A velocity whose denoised guess is ``x0`` wherever it is asked: v = (x_t - x0) / t."""
    def v(x_t: Tensor, t: Tensor) -> Tensor:
        return (x_t - x0) / t.reshape(-1, 1, 1, 1)
    return v


def test_dmd_gradient_is_the_normalised_ca_plus_dm_direction() -> None:
    """CA is x0_c minus the sampler's guided x0 (cfg_velocity, rescaled per latent cell), DM
    is x0_fake - x0_c; each is divided by the teacher's mean error on the sample."""
    g = torch.Generator().manual_seed(0)
    shape = (3, 4, 6, 6)
    a, b, f = (torch.randn(shape, generator=g) for _ in range(3))  # teacher c/u, fake x0
    x = torch.randn(shape, generator=g).requires_grad_(True)
    t = torch.full((3,), 0.5)
    terms = dmd_loss(x, _pointing_at(a), _pointing_at(b), _pointing_at(f), guidance=5.0,
                     t_ca=t, t_dm=t * 0.6, ca_weight=1.0, dm_weight=0.5,
                     generator=torch.Generator().manual_seed(1))
    terms.loss.backward()
    x_t = add_noise(x.detach(), torch.randn(shape, generator=torch.Generator().manual_seed(1)), t)
    tt = t.reshape(-1, 1, 1, 1)
    guided = x_t - tt * cfg_velocity((x_t - a) / tt, (x_t - b) / tt, 5.0, token_dim=1)
    plain = a + 4.0 * (a - b)  # the unrescaled combination overshoots the sampler's
    assert (a - guided).norm() < (a - plain).norm()
    scale = (x.detach() - a).abs().mean(dim=(1, 2, 3), keepdim=True)
    want = ((a - guided) + 0.5 * (f - a)) / scale / (3 * x[0].numel())
    torch.testing.assert_close(x.grad, want, rtol=1e-4, atol=1e-6)
    assert terms.ca_norm > 0 and terms.dm_norm > 0


def test_dmd_without_guidance_has_no_ca_term_and_vanishes_when_fake_matches_teacher() -> None:
    a = torch.randn(2, 4, 4, 4)
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    t = torch.full((2,), 0.3)
    terms = dmd_loss(x, _pointing_at(a), _pointing_at(a + 1), _pointing_at(a), guidance=1.0,
                     t_ca=t, t_dm=t)
    terms.loss.backward()
    assert terms.ca_norm == 0 and terms.dm_norm == 0
    assert float(x.grad.abs().max()) == 0


def test_dmd_refuses_guidance_below_one() -> None:
    x = torch.zeros(1, 4, 4, 4)
    v = _pointing_at(x)
    with pytest.raises(ValueError, match="distill.guidance 0.5"):
        dmd_loss(x, v, v, v, 0.5, torch.ones(1) / 2, torch.ones(1) / 2)


def test_fake_score_loss_is_zero_for_the_exact_velocity() -> None:
    x = torch.randn(2, 4, 4, 4)
    t = torch.tensor([0.2, 0.9])
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))

    def exact(x_t: Tensor, tt: Tensor) -> Tensor:
        torch.testing.assert_close(x_t, add_noise(x, noise, tt))
        return noise - x

    assert float(fake_score_loss(exact, x, t, generator=g)) < 1e-10
    assert float(fake_score_loss(lambda x_t, tt: torch.zeros_like(x_t), x, t)) > 0.5


def test_gan_losses_closed_forms_and_r1() -> None:
    zero = torch.zeros(4)
    logistic, r1 = discriminator_loss(zero, zero, zero, r1_gamma=1.0)
    assert math.isclose(float(logistic), 2 * math.log(2), rel_tol=1e-6) and float(r1) == 0
    _, r1 = discriminator_loss(zero, zero, zero + 0.5, r1_gamma=2.0)
    assert math.isclose(float(r1), 0.5, rel_tol=1e-6)
    assert math.isclose(float(generator_gan_loss(zero)), math.log(2), rel_tol=1e-6)
    # the student gains by raising D's logit on its samples
    assert float(generator_gan_loss(torch.full((4,), 3.0))) < float(generator_gan_loss(zero))
    d = Discriminator(width=8, hidden=16)
    assert d(torch.randn(5, 7, 8)).shape == (5,)


def test_ida_moves_the_fake_score_toward_the_student_and_checks_shapes() -> None:
    fake, student = nn.Linear(3, 2), nn.Linear(3, 2)
    before = fake.weight.detach().clone()
    ida_update(fake, student, mu=0.03)
    torch.testing.assert_close(fake.weight, 0.97 * before + 0.03 * student.weight)
    with pytest.raises(ValueError, match="weight differs"):
        ida_update(fake, nn.Linear(4, 2), mu=0.03)
    with pytest.raises(ValueError, match="ida_mu 1.5"):
        ida_update(fake, student, mu=1.5)


def test_ida_moves_deepspeeds_fp32_master_under_bf16_zero2() -> None:
    """The optimizer copies its fp32 masters over the bf16 module after each step: IDA on the
    module alone would be undone by the next step."""
    from deepspeed.utils import safe_get_full_fp32_param

    from lens_model.train.engine import TrainConfig, Trainer

    torch.manual_seed(0)
    fake, student = nn.Linear(8, 4), nn.Linear(8, 4)
    trainer = Trainer(nn.Linear(2, 1), lambda e, b: e(b).sum(),
                      TrainConfig(lr=1e-9, precision="bf16", zero_stage=2, ema_decay=None))
    engine = trainer.add_companion("fake", fake, TrainConfig(lr=1e-9, precision="bf16",
                                                             zero_stage=2, ema_decay=None))
    before = safe_get_full_fp32_param(engine.module.weight).clone()
    ida_update(engine.module, student, mu=0.25)
    want = 0.75 * before + 0.25 * student.weight.detach()
    torch.testing.assert_close(safe_get_full_fp32_param(engine.module.weight), want)
    # a step with no gradient: the module must come back from the moved master
    engine.backward(engine(torch.zeros(1, 8, dtype=torch.bfloat16)).float().sum() * 0)
    engine.step()
    torch.testing.assert_close(engine.module.weight.float(), want, atol=1e-2, rtol=0)
