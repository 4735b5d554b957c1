"""One Lens-Turbo update on a small random teacher: which weights each half trains."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lens_model.denoiser import LensDenoiser
from lens_model.distill.losses import Discriminator
from lens_model.distill.step import Critic, DistillBatch, DistillStep
from lens_model.recipe import DistillSection
from lens_model.text_encoder import TextConnector
from lens_model.transformer import LensTransformer2DModel


class _Engine:
    """The two methods and one attribute DistillStep uses of a DeepSpeed engine, on plain SGD,
    recording the gradient norms each update saw."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
        self.seen: list[dict[str, float]] = []

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.seen.append({n: float(p.grad.norm()) for n, p in self.module.named_parameters()
                          if p.grad is not None})
        self.opt.step()
        self.opt.zero_grad()


def _teacher() -> LensDenoiser:
    torch.manual_seed(0)
    transformer = LensTransformer2DModel.from_preset("tiny", in_channels=4)
    for p in transformer.parameters():  # off adaLN-zero, so outputs depend on the inputs
        nn.init.normal_(p, std=0.02)
    width = transformer.transformer_config.text_dim or transformer.transformer_config.width
    return LensDenoiser(transformer, TextConnector(n_layers=2, hidden=16, width=width))


def _batch() -> DistillBatch:
    g = torch.Generator().manual_seed(1)
    return DistillBatch(torch.randn(2, 4, 8, 8, generator=g),
                        [torch.randn(5, 32, generator=g), torch.randn(3, 32, generator=g)])


@pytest.fixture()
def step() -> dict[str, Any]:
    teacher = _teacher().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    width = teacher.transformer.transformer_config.width
    critic = _Engine(Critic(copy.deepcopy(student), Discriminator(width, 32)))
    cfg = DistillSection(ttur=3, lambda_g=0.5)
    fn = DistillStep(cfg, teacher, torch.tensor([1.0, 0.75, 0.5, 0.25]), lambda: critic)
    return {"teacher": teacher, "student": student, "critic": critic, "fn": fn}


def test_ttur_updates_the_critic_then_the_student_loss_trains_only_the_student(
        step: dict[str, Any]) -> None:
    student, critic, teacher = step["student"], step["critic"], step["teacher"]
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    disc_before = [p.detach().clone() for p in critic.module.disc.parameters()]
    loss = step["fn"](student, _batch())
    assert len(critic.seen) == 3  # ttur critic updates before the student's loss
    assert all(any("fake." in n for n in seen) and any("disc." in n for n in seen)
               for seen in critic.seen)
    # the critic's updates left the student alone
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters())
    assert all(p.grad is None for p in student.parameters())
    loss.backward()
    grads = [p.grad for p in student.transformer.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in critic.module.parameters())  # not the critic's
    assert all(p.grad is None for p in teacher.parameters())  # nor the frozen teacher's
    assert not all(torch.equal(a, b) for a, b in zip(disc_before, critic.module.disc.parameters(),
                                                      strict=True))  # the critic did learn
    parts = step["fn"].parts
    assert {"student/dmd", "student/gan", "critic/fake_loss", "critic/disc_loss",
            "critic/r1"} <= set(parts)
    assert all(torch.isfinite(torch.tensor(v)) for v in parts.values())


def test_backward_simulation_reaches_each_student_step(step: dict[str, Any]) -> None:
    fn, student = step["fn"], step["student"]
    states, mask = torch.randn(2, 4, 32), torch.ones(2, 4, dtype=torch.bool)
    noise = torch.randn(2, 4, 8, 8)
    for k, sigma in enumerate([1.0, 0.75, 0.5, 0.25]):
        x0, t = fn.student_x0(student, states, mask, noise, k)
        assert x0.shape == noise.shape and torch.allclose(t, torch.full((2,), sigma))
        assert x0.requires_grad  # only the last step carries the graph
    with pytest.raises(ValueError, match="disc_block 7: the teacher has"):
        DistillStep(DistillSection(disc_block=7), step["teacher"], torch.ones(4),
                    lambda: step["critic"])


def test_ca_timesteps_stay_in_their_range_and_above_the_step_when_asked(
        step: dict[str, Any]) -> None:
    t_k = torch.tensor([1.0, 0.75, 0.5, 0.25]).repeat(500)
    above = step["fn"].ca_timesteps(t_k)  # the default: above the step, in [0.02, 0.98]
    assert (above >= t_k.clamp(max=0.98)).all() and (above <= 0.98).all()
    cfg = DistillSection(ca_t_range=(0.2, 0.8), ca_above_step=False)
    anywhere = DistillStep(cfg, step["teacher"], torch.ones(4), lambda: None).ca_timesteps(t_k)
    assert anywhere.min() >= 0.2 and anywhere.max() <= 0.8
    assert (anywhere < t_k.clamp(max=0.8) - 0.05).any()  # not tied to the step any more
    with pytest.raises(ValueError, match=r"ca_t_range \[0.8, 0.2\]: give \[low, high\]"):
        DistillSection(ca_t_range=(0.8, 0.2))
