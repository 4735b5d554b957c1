"""Flow matching: noising path, per-sample loss, shifted logit-normal timesteps, Euler sampler."""

from __future__ import annotations

import math

import pytest
import torch

from lens_model.flow_matching import (
    add_noise,
    cfg_velocity,
    euler_sample,
    euler_sigmas,
    flow_sample,
    heun_sample,
    per_token,
    sample_timesteps,
    shift,
    shift_mu,
    velocity_loss,
    velocity_target,
)
from lens_model.packing import pack_tokens


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logit_normal_mean_var(mean: float, std: float) -> tuple[float, float]:
    """Mean and variance of sigmoid(N(mean, std)) by quadrature over +-8 std."""
    z = torch.linspace(-8.0, 8.0, 8001, dtype=torch.float64)
    w = torch.exp(-0.5 * z * z)
    w = w / w.sum()
    s = torch.sigmoid(mean + std * z)
    m = float((w * s).sum())
    return m, float((w * (s - m) ** 2).sum())


# --- noising path and loss ---------------------------------------------------------------

def test_add_noise_endpoints_per_sample_and_velocity() -> None:
    x0 = torch.randn(3, 4, 2, 2, generator=_gen(0))
    noise = torch.randn(3, 4, 2, 2, generator=_gen(1))
    t = torch.tensor([0.0, 1.0, 0.25])
    xt = add_noise(x0, noise, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], noise[1])
    torch.testing.assert_close(xt[2], 0.75 * x0[2] + 0.25 * noise[2])
    # the path is straight: its time derivative is the target everywhere
    h = 1e-2
    deriv = (add_noise(x0, noise, t * 0.5 + h) - add_noise(x0, noise, t * 0.5)) / h
    torch.testing.assert_close(deriv, velocity_target(x0, noise), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"one value per leading index"):
        add_noise(x0, noise, torch.rand(2))


def test_velocity_loss_averages_per_sample_not_per_token() -> None:
    # sample 0: 1 token with squared error 4 per channel; sample 1: 3 tokens exact; 2 padding
    target = torch.zeros(6, 2)
    pred = torch.zeros(6, 2)
    pred[0] = 2.0
    pred[4:] = 100.0  # padding: ignored however wrong
    seg = torch.tensor([0, 1, 1, 1, -1, -1])
    assert velocity_loss(pred, target, segment_ids=seg).item() == pytest.approx(2.0)  # (4 + 0) / 2
    # a token-mean over the real tokens would say 1.0: the big sample would dominate
    assert (pred[:4] - target[:4]).square().mean().item() == pytest.approx(1.0)
    w = torch.tensor([0.5, 3.0])
    assert velocity_loss(pred, target, w, seg).item() == pytest.approx((0.5 * 4 + 0) / 2)


def test_velocity_loss_packed_equals_unpacked_for_equal_sizes() -> None:
    pred, target = torch.randn(3, 4, 8, generator=_gen(2)), torch.randn(3, 4, 8, generator=_gen(3))
    grids = [(2, 2)] * 3
    p_packed, seq = pack_tokens(list(pred), grids, budget=16)
    t_packed, _ = pack_tokens(list(target), grids, budget=16)
    packed = velocity_loss(p_packed, t_packed, segment_ids=seq.segment_ids)
    torch.testing.assert_close(packed, velocity_loss(pred, target))
    torch.testing.assert_close(velocity_loss(pred, target), (pred - target).square().mean())


def test_velocity_loss_bad_input() -> None:
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"must match"):
        velocity_loss(x, torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"without its channel dim"):
        velocity_loss(x, x, segment_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"no real tokens"):
        velocity_loss(x, x, segment_ids=torch.full((4,), -1))
    with pytest.raises(ValueError, match=r"one value per sample"):
        velocity_loss(x, x, torch.ones(2), segment_ids=torch.tensor([0, 1, 2, 2]))


def test_per_token_spreads_sample_values() -> None:
    seg = torch.tensor([0, 0, 1, 2, 2, -1])
    out = per_token(torch.tensor([0.1, 0.5, 0.9]), seg)
    torch.testing.assert_close(out, torch.tensor([0.1, 0.1, 0.5, 0.9, 0.9, 0.0]))


# --- timesteps -------------------------------------------------------------------------

@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.5, 0.8)])
def test_logit_normal_moments(mean: float, std: float) -> None:
    n = 200_000
    t = sample_timesteps(torch.full((n,), 1024), _gen(4), mean, std, shift_rule=None)
    assert 0 < t.min() and t.max() < 1
    logit = torch.log(t / (1 - t)).double()
    assert logit.mean().item() == pytest.approx(mean, abs=4 * std / math.sqrt(n))
    assert logit.std().item() == pytest.approx(std, rel=0.01)
    m, v = _logit_normal_mean_var(mean, std)
    assert t.double().mean().item() == pytest.approx(m, abs=2e-3)
    assert t.double().var().item() == pytest.approx(v, rel=0.02)


def test_shift_monotone_identity_and_toward_noise() -> None:
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(shift(t, 0.0), t)
    for mu in (0.5, 1.06, 1.3, -0.5):
        s = shift(t, mu)
        assert bool((s[1:] > s[:-1]).all())  # strictly monotone
        assert s[0].item() == 0.0 and s[-1].item() == 1.0
        # closed form: the shift adds mu in logit space, so shift(1/2, mu) = sigmoid(mu)
        assert shift(torch.tensor(0.5), mu).item() == pytest.approx(1 / (1 + math.exp(-mu)))
    inner = t[1:-1]
    assert bool((shift(inner, 1.3) > shift(inner, 1.0)).all())
    assert bool((shift(inner, 1.0) > inner).all())  # mu > 0: noisier
    # the brief's formula, exp(mu) / (exp(mu) + (1/t - 1)), on the interior
    mu = 1.06
    torch.testing.assert_close(shift(inner, mu), math.exp(mu) / (math.exp(mu) + (1 / inner - 1)))


def test_shift_mu_rule_endpoints_and_stage1_point() -> None:
    assert shift_mu(256).item() == pytest.approx(1.0)
    assert shift_mu(4096).item() == pytest.approx(1.3)
    assert shift_mu(1024).item() == pytest.approx(1.06)  # stage 1: mu 1.06 at 1024 tokens
    # extrapolated by default (1440^2 at inference = 8100 tokens), clamped on request
    assert shift_mu(8100).item() == pytest.approx(1.0 + 0.3 * (8100 - 256) / 3840)
    assert shift_mu(8100, clamp=True).item() == pytest.approx(1.3)
    assert shift_mu(64, clamp=True).item() == pytest.approx(1.0)
    torch.testing.assert_close(shift_mu(torch.tensor([256, 4096])), torch.tensor([1.0, 1.3]))
    with pytest.raises(ValueError, match=r"max_tokens"):
        shift_mu(100, base_tokens=512, max_tokens=256)


def test_sample_timesteps_per_sample_shift_in_mixed_batch() -> None:
    tokens = torch.tensor([256, 4096, 1024, 256, 8100])
    t = sample_timesteps(tokens, _gen(5))
    u = torch.randn(5, generator=_gen(5))  # the same draws
    expected = torch.sigmoid(u + shift_mu(tokens))  # shift = +mu in logit space
    torch.testing.assert_close(t, expected)
    # a constant mu equals a logit-normal with its mean moved by mu
    const = sample_timesteps(tokens, _gen(5), mean=0.2, shift_rule=1.06)
    torch.testing.assert_close(const, torch.sigmoid(u + 0.2 + 1.06))
    # with the same draw for every sample, more tokens means a noisier t
    same = sample_timesteps(torch.tensor([256, 1024, 4096]), _gen(6), std=1e-6)
    assert bool((same[1:] > same[:-1]).all())
    with pytest.raises(ValueError, match=r"\(S,\)"):
        sample_timesteps(torch.ones(2, 2), _gen(0))


def test_sample_timesteps_deterministic_with_generator() -> None:
    tokens = torch.tensor([256, 1024, 4096] * 10)
    a, b = sample_timesteps(tokens, _gen(7)), sample_timesteps(tokens, _gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_timesteps(tokens, _gen(8)))


# --- sampler ---------------------------------------------------------------------------

def test_euler_sigmas_schedule() -> None:
    s = euler_sigmas(20, 1.15)
    assert s.shape == (21,) and s[0].item() == 1.0 and s[-1].item() == 0.0
    assert s[-2].item() == pytest.approx(shift(torch.tensor(1 / 20), 1.15).item(), rel=1e-6)
    assert bool((s[1:] < s[:-1]).all())
    torch.testing.assert_close(euler_sigmas(4, 0.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert euler_sigmas(4, torch.tensor([0.0, 1.0])).shape == (5, 2)
    with pytest.raises(ValueError, match=r"steps"):
        euler_sigmas(0, 1.0)


@pytest.mark.parametrize(("steps", "mu"), [(1, 0.0), (4, 1.0), (20, 1.3), (7, -0.3)])
def test_euler_recovers_x0_under_exact_velocity(steps: int, mu: float) -> None:
    x0 = torch.randn(3, 16, 8, generator=_gen(9))
    noise = torch.randn(3, 16, 8, generator=_gen(10))
    seen: list[float] = []

    def exact(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # the straight path's velocity through x at time t: (x - x0) / t = noise - x0 on it
        seen.append(t[0].item())
        return (x - x0) / t.view(-1, 1, 1)

    out = euler_sample(exact, noise, steps, mu)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    assert len(seen) == steps and seen[0] == 1.0


def test_euler_per_sample_mu_and_guidance() -> None:
    x0 = torch.randn(2, 10, 6, generator=_gen(11))
    noise = torch.randn(2, 10, 6, generator=_gen(12))

    def exact(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ref = torch.cat([x0] * (len(x) // len(x0)))
        return (x - ref) / t.view(-1, 1, 1)

    mus = torch.tensor([shift_mu(256).item(), shift_mu(4096).item()])
    torch.testing.assert_close(euler_sample(exact, noise, 8, mus), x0, atol=1e-5, rtol=0)
    # guidance 1 keeps the conditioned half alone, and the rescale is then a no-op
    torch.testing.assert_close(euler_sample(exact, noise, 8, 1.0, guidance=1.0), x0,
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"one mu per sample"):
        euler_sample(exact, noise, 4, torch.tensor([1.0, 1.0, 1.0]))


def _gaussian_flow(m: float, s: float):
    """The exact rectified-flow velocity to data N(m, s^2) from noise N(0, 1), and its ODE
    solution. x_t = (1 - t) m + sigma_t z with sigma_t^2 = (1 - t)^2 s^2 + t^2 and z fixed along
    a path, so integrating from noise z at t = 1 ends at m + s z; the field is curved in t."""
    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.view(-1, *([1] * (x.ndim - 1))).to(torch.float64)
        var = (1 - t) ** 2 * s * s + t * t
        return (-m + (t - (1 - t) * s * s) / var * (x - (1 - t) * m)).to(x.dtype)

    return velocity, lambda noise: m + s * noise


@pytest.mark.parametrize("mu", [0.0, 1.0])
def test_heun_is_second_order_where_euler_is_first(mu: float) -> None:
    velocity, solution = _gaussian_flow(0.5, 1.0)
    noise = torch.randn(4, 64, generator=_gen(15), dtype=torch.float64)

    def err(sampler, steps: int) -> float:
        return (sampler(velocity, noise, steps, mu) - solution(noise)).abs().max().item()

    e8, e20 = err(euler_sample, 8), err(euler_sample, 20)
    h8, h20 = err(heun_sample, 8), err(heun_sample, 20)
    # 44x at mu 0; 7x at mu 1, where the shifted schedule leaves a larger last (Euler) step
    assert h20 < e20 / (20 if mu == 0 else 5)
    # observed order from 8 to 20 steps, error ~ steps^-order: Euler 1, Heun 2
    assert math.log(e8 / e20) / math.log(20 / 8) == pytest.approx(1.0, abs=0.3)
    assert math.log(h8 / h20) / math.log(20 / 8) > 1.7


def test_heun_calls_guidance_and_last_step() -> None:
    velocity, _ = _gaussian_flow(-0.3, 0.7)
    noise = torch.randn(2, 8, 4, generator=_gen(16))
    calls: list[tuple[int, float]] = []

    def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append((len(x), t[0].item()))
        return velocity(x, t)

    sigmas = euler_sigmas(5, 0.7)
    out = heun_sample(counted, noise, 5, 0.7)
    # 2N - 1 model calls: the step to sigma 0 is Euler, so t = 0 is never queried
    assert [t for _, t in calls] == pytest.approx(
        [sigmas[0].item()] + [v for v in sigmas[1:-1].tolist() for _ in range(2)])
    # CFG at scale 1 keeps the conditioned half (garbage in the unconditioned one)
    calls.clear()

    def with_uncond(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = counted(x, t)
        return torch.cat([v[:len(v) // 2], torch.randn_like(v[len(v) // 2:])])

    guided = heun_sample(with_uncond, noise, 5, 0.7, guidance=1.0)
    torch.testing.assert_close(guided, out)
    assert {b for b, _ in calls} == {4} and len(calls) == 9
    # one step is Euler in both; per-sample mu works as in Euler
    torch.testing.assert_close(heun_sample(velocity, noise, 1, 0.7),
                               euler_sample(velocity, noise, 1, 0.7))
    mus = torch.tensor([0.2, 1.1])
    both = heun_sample(velocity, noise, 6, mus)
    torch.testing.assert_close(both[1:], heun_sample(velocity, noise[1:], 6, 1.1))
    with pytest.raises(ValueError, match=r"order must be 1 \(Euler\) or 2 \(Heun\)"):
        flow_sample(velocity, noise, sigmas, order=3)


def test_cfg_velocity_rescales_each_token_to_cond_norm() -> None:
    cond = torch.randn(2, 5, 4, generator=_gen(13))
    uncond = torch.randn(2, 5, 4, generator=_gen(14))
    out = cfg_velocity(cond, uncond, 5.0)
    combined = uncond + 5.0 * (cond - uncond)
    torch.testing.assert_close(out.norm(dim=-1), cond.norm(dim=-1))
    # same direction as the plain guided velocity, token by token
    cos = torch.nn.functional.cosine_similarity(out, combined, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))
    torch.testing.assert_close(cfg_velocity(cond, uncond, 1.0), cond)
