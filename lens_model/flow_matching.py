"""Rectified flow: the noising path, the velocity loss, timestep sampling with a resolution
shift, and the Euler and Heun samplers.

Convention (t = 1 is pure noise, as in SD3/FLUX):
    x_t = (1 - t) * x0 + t * noise,    v = dx_t/dt = noise - x0.

Timesteps are logit-normal, t = sigmoid(N(mean, std)), then shifted toward noise by
``shift(t, mu)``: more tokens keep more signal at a given t, so bigger images need noisier
timesteps. The Lens paper's rule for its training stages (arXiv 2605.21573): stage 2 takes mu
linear in the image-token count, 1.0 at 256 tokens to 1.3 at 4096; stage 1 uses mu = 1.06 at
1024 tokens, which is that same line at 1024 tokens (1.0 + 0.3 * 768 / 3840 = 1.06), so
``shift_mu`` serves both stages. Outside [256, 4096] the line is extrapolated, as FLUX-style
length shifts are: inference goes up to 1440^2 (8100 tokens, mu 1.61) and the tiny recipe down
to 64 tokens (mu 0.985). Pass ``clamp=True`` to hold the endpoint values instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ShiftRule = Callable[[Tensor], Tensor]
VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x (B, ...), t (B,)) -> v


def add_noise(x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """x_t = (1 - t) x0 + t noise, with ``t`` (B,) per leading index (sample or packed token)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must match")
    t = _per_row(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The rectified-flow velocity noise - x0 (constant along each straight path)."""
    return noise - x0


def per_token(values: Tensor, segment_ids: Tensor) -> Tensor:
    """Per-sample values (S,) spread over a packed sequence's tokens (L,); padding gets 0."""
    out = values[segment_ids.clamp(min=0)]  # (L,)
    return torch.where(segment_ids >= 0, out, torch.zeros_like(out))


def velocity_loss(pred: Tensor, target: Tensor, weights: Tensor | None = None,
                  segment_ids: Tensor | None = None) -> Tensor:
    """Mean squared error averaged per sample first, then over samples.

    Unpacked: ``pred`` (B, ...), one sample per leading index. Packed: ``segment_ids`` has
    ``pred``'s shape minus the channel dim, e.g. (L,) for (L, C); tokens with the same id are
    one sample (ids are global, so give several packed rows distinct ids), -1 is padding and
    ignored. Each sample counts once however many tokens it has, so a 1024^2 image does not
    outweigh a 512^2 one 4:1. ``weights`` (S,) scales each sample's loss (the plain mean over
    samples is kept, as in SD3-style loss weighting); S = B, or max segment id + 1.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must match")
    err = (pred.float() - target.float()).square()
    if segment_ids is None:
        per_sample = err.reshape(err.shape[0], -1).mean(dim=1)  # (B,)
        present = torch.ones_like(per_sample, dtype=torch.bool)
    else:
        if segment_ids.shape != pred.shape[:-1]:
            raise ValueError(f"segment_ids {tuple(segment_ids.shape)} must be pred's shape "
                             f"without its channel dim, {tuple(pred.shape[:-1])}")
        ids = segment_ids.reshape(-1)  # (N,)
        real = ids >= 0
        if not bool(real.any()):
            raise ValueError("velocity_loss got a packed sequence with no real tokens "
                             "(all segment ids are -1); drop empty batches before the loss")
        ids = ids[real]
        tok_err = err.reshape(-1, err.shape[-1])[real].mean(dim=1)  # (N_real,)
        n = int(ids.max()) + 1 if weights is None else max(int(ids.max()) + 1, len(weights))
        sums = torch.zeros(n, device=err.device).index_add_(0, ids, tok_err)
        counts = torch.bincount(ids, minlength=n).to(sums)
        present = counts > 0
        per_sample = sums / counts.clamp(min=1)  # (S,)
    if weights is not None:
        if weights.shape != per_sample.shape:
            raise ValueError(f"weights {tuple(weights.shape)} must hold one value per sample, "
                             f"{tuple(per_sample.shape)}")
        per_sample = per_sample * weights.float()
    return per_sample[present].mean()


def shift(t: Tensor, mu: Tensor | float) -> Tensor:
    """The SD3/FLUX time shift: t' = exp(mu) / (exp(mu) + (1/t - 1)).

    This is the resolution-dependent time shift used by FLUX-style flow matching (the SD3
    paper's shift with alpha = exp(mu)). Written as e^mu t / (e^mu t + 1 - t), the same value
    with no division by t, so t = 0 maps to 0 and t = 1 to 1. mu = 0 is the identity, and mu > 0
    moves every t in (0, 1) toward 1 (noisier).
    """
    a = torch.exp(torch.as_tensor(mu, dtype=t.dtype, device=t.device))
    return a * t / (a * t + (1 - t))


def shift_mu(tokens: Tensor | int | float, base_tokens: int = 256, base_mu: float = 1.0,
             max_tokens: int = 4096, max_mu: float = 1.3, clamp: bool = False) -> Tensor:
    """mu linear in image tokens through (base_tokens, base_mu) and (max_tokens, max_mu).

    Extrapolated outside that range unless ``clamp`` (see the module docstring).
    """
    if max_tokens <= base_tokens:
        raise ValueError(f"max_tokens ({max_tokens}) must be > base_tokens ({base_tokens})")
    n = torch.as_tensor(tokens, dtype=torch.float32)
    if clamp:
        n = n.clamp(base_tokens, max_tokens)
    return base_mu + (n - base_tokens) * (max_mu - base_mu) / (max_tokens - base_tokens)


def sample_timesteps(token_counts: Tensor, generator: torch.Generator | None = None,
                     mean: float = 0.0, std: float = 1.0,
                     shift_rule: ShiftRule | float | None = shift_mu) -> Tensor:
    """One shifted logit-normal t per sample (S,), mu from each sample's own token count.

    ``shift_rule`` maps token counts (S,) to mu (S,); a float is a constant mu; None: no shift.
    In a packed batch each segment is a sample, so mixed resolutions get their own shifts.
    """
    if token_counts.ndim != 1:
        raise ValueError(f"token_counts must be (S,), got {tuple(token_counts.shape)}")
    if std <= 0:
        raise ValueError(f"logit-normal std must be > 0, got {std}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.randn(len(token_counts), generator=generator, device=gen_device) * std + mean
    t = torch.sigmoid(u).to(token_counts.device)  # (S,)
    if shift_rule is None:
        return t
    if isinstance(shift_rule, int | float):
        return shift(t, float(shift_rule))
    mu = torch.as_tensor(shift_rule(token_counts), dtype=t.dtype, device=t.device)
    return shift(t, mu)


def euler_sigmas(steps: int, mu: Tensor | float) -> Tensor:
    """Noise levels linspace(1, 1/N, N) shifted by ``mu``, then 0: (N + 1,), or (N + 1, B)
    when ``mu`` is (B,)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    mu = torch.as_tensor(mu, dtype=torch.float64)
    if mu.ndim == 1:
        base = base[:, None]  # (N, 1) against (B,)
    sig = shift(base, mu)
    return torch.cat([sig, torch.zeros_like(sig[:1])]).float()


def cfg_velocity(cond: Tensor, uncond: Tensor, scale: float, token_dim: int = -1) -> Tensor:
    """Classifier-free guidance, uncond + s (cond - uncond), rescaled per token to ||cond||.

    The paper's inference rescales each token's guided velocity by ||cond|| / ||combined||
    (norms over ``token_dim``, the feature dim of a token), which keeps high guidance from
    overshooting the data range. At scale 1 that is ``cond`` itself, returned exactly rather
    than through rounding.
    """
    if scale == 1:
        return cond
    combined = uncond + scale * (cond - uncond)
    c_norm = torch.linalg.vector_norm(cond, dim=token_dim, keepdim=True)
    g_norm = torch.linalg.vector_norm(combined, dim=token_dim, keepdim=True)
    return combined * (c_norm / g_norm.clamp(min=1e-12))


def flow_sample(velocity_fn: VelocityFn, noise: Tensor, sigmas: Tensor,
                guidance: float | None = None, token_dim: int = -1, order: int = 1) -> Tensor:
    """Integrate dx/dt = v from ``sigmas[0]`` (``noise`` (B, ...)) down the schedule ``sigmas``
    ((N + 1,), or (N + 1, B) per sample, ending at 0), with Euler (``order=1``) or Heun
    (``order=2``) steps.

    ``velocity_fn(x, t)`` takes x (B, ...) and t (B,). With ``guidance`` it is called on the
    batch of 2B, [x; x] with [t; t] (its first half conditioned, its second half
    unconditioned, as the caller arranges), and the halves are combined by :func:`cfg_velocity`;
    Heun guides both of its evaluations this way. Heun's step to sigma 0 stays Euler: its
    corrector would query the model at t = 0, which training almost never samples, for the
    last and smallest step (the EDM convention). Euler takes N model calls, Heun 2N - 1.
    """
    if order not in (1, 2):
        raise ValueError(f"sampler order must be 1 (Euler) or 2 (Heun), got {order}")
    b = noise.shape[0]
    sigmas = sigmas.to(noise.device)
    if sigmas.ndim not in (1, 2) or len(sigmas) < 2:
        raise ValueError(f"sigmas of shape {tuple(sigmas.shape)}: expected (N + 1,) or "
                         f"(N + 1, B) with N >= 1, as euler_sigmas gives")
    if sigmas.ndim == 2 and sigmas.shape[1] != b:
        raise ValueError(f"sigmas (mu) hold {sigmas.shape[1]} values for a batch of {b}; pass "
                         f"one mu per sample or a single float")
    x = noise
    for i in range(len(sigmas) - 1):
        t, t_next = (s.expand(b) if s.ndim == 0 else s for s in (sigmas[i], sigmas[i + 1]))
        dt = _per_row(t_next - t, x)
        v = _guided(velocity_fn, x, t, guidance, token_dim)
        x_next = x + dt * v
        if order == 2 and bool((t_next > 0).all()):
            v_next = _guided(velocity_fn, x_next, t_next, guidance, token_dim)
            x_next = x + dt * (v + v_next) / 2  # trapezoid: the mean slope over the step
        x = x_next
    return x


def euler_sample(velocity_fn: VelocityFn, noise: Tensor, steps: int, mu: Tensor | float,
                 guidance: float | None = None, token_dim: int = -1) -> Tensor:
    """N Euler steps from t = 1 to 0 on :func:`euler_sigmas` (see :func:`flow_sample`)."""
    return flow_sample(velocity_fn, noise, euler_sigmas(steps, mu), guidance, token_dim, order=1)


def heun_sample(velocity_fn: VelocityFn, noise: Tensor, steps: int, mu: Tensor | float,
                guidance: float | None = None, token_dim: int = -1) -> Tensor:
    """N Heun steps (the last one Euler) on :func:`euler_sigmas` (see :func:`flow_sample`)."""
    return flow_sample(velocity_fn, noise, euler_sigmas(steps, mu), guidance, token_dim, order=2)


def _guided(velocity_fn: VelocityFn, x: Tensor, t: Tensor, guidance: float | None,
            token_dim: int) -> Tensor:
    """v(x, t), or with ``guidance`` the CFG combination of one call on [x; x] (2B)."""
    if guidance is None:
        return velocity_fn(x, t.to(x.dtype))
    b = x.shape[0]
    both = velocity_fn(torch.cat([x, x]), torch.cat([t, t]).to(x.dtype))  # (2B, ...)
    return cfg_velocity(both[:b], both[b:], guidance, token_dim)


def _per_row(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` as a tensor broadcasting per leading index of ``x``: (B,) -> (B, 1, ..., 1)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t {tuple(t.shape)} must be a scalar or one value per leading index "
                         f"of x {tuple(x.shape)}, i.e. ({x.shape[0]},)")
    return t.reshape(-1, *([1] * (x.ndim - 1)))

