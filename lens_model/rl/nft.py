"""DiffusionNFT (arXiv 2509.16117): online RL on the forward process, on a LoRA adapter.

Rollouts are drawn by the current policy with any sampler and judged; each group's rewards
(one prompt, several images) become r = 1/2 + 1/2 clip((raw - mean) / Z, -1, 1) (the Lens
paper's form), with Z = ``adv_clip`` x the group's standard deviation (the DiffusionNFT code
normalises advantages by the group std and clips them; the Lens paper leaves Z open). Then a
flow-matching loss on the clean samples trains two implicit policies built from the policy v
and the old policy v_old:

    v+ = (1 - beta) v_old + beta v,    v- = (1 + beta) v_old - beta v,
    L  = [ r ||v+ - (eps - x0)||^2 + (1 - r) ||v- - (eps - x0)||^2 ] / beta
         + kl_weight ||v - v_base||^2,

so good samples pull v toward their velocity and bad ones push it away, scaled by how far
r sits from 1/2. Choices the paper leaves open, made here: the squared error is the plain
per-sample velocity MSE (the DiffusionNFT code divides an x0-error by its mean absolute
value; a plain MSE keeps one loss with pretraining); timesteps follow pretraining's shifted
logit-normal law, where the model is accurate; the KL term is a velocity MSE to the frozen
base model (LoRA off), weighted by the recipe's ``kl_weight`` (1e-4 in the Lens paper); the
old policy is the adapter copy ``old <- d old + (1 - d) policy`` after every step.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lens_model.denoiser import LensDenoiser
from lens_model.flow_matching import velocity_loss


def add_lora(denoiser: LensDenoiser, rank: int, alpha: int, targets: list[str]) -> list[str]:
    """Inject LoRA (peft) into the transformer's ``targets`` Linear layers, freeze everything
    else; returns the adapter parameters' names. LoRA's B starts at zero: the adapted model
    starts as the base model."""
    from peft import LoraConfig, inject_adapter_in_model

    denoiser.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    try:
        inject_adapter_in_model(config, denoiser.transformer)
    except ValueError as exc:
        raise ValueError(f"rl.lora_targets {targets}: {exc}; name Linear layers of the "
                         f"transformer, e.g. qkv, out, gate_up, down") from None
    names = [n for n, _ in denoiser.named_parameters() if "lora_" in n]
    for name, param in denoiser.named_parameters():
        param.requires_grad_(name in names)
    return names


def _lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_off(module: nn.Module) -> Iterator[None]:
    """The base model: every LoRA layer bypassed for the duration."""
    layers = [m for _, m in _lora_layers(module)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def merged(denoiser: LensDenoiser) -> LensDenoiser:
    """A copy with every LoRA merged into its base Linear and the adapter layers removed: a
    plain :class:`LensDenoiser` that saves and loads like a pretrained one."""
    out = copy.deepcopy(denoiser)
    for name, layer in _lora_layers(out):
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, layer.get_base_layer())
    return out.requires_grad_(False)


def adapter_state(denoiser: LensDenoiser) -> dict[str, Tensor]:
    """The adapter's weights (names as in ``denoiser``), for saving on their own."""
    return {n: p.detach().contiguous() for n, p in denoiser.named_parameters() if "lora_" in n}


def _buffer(name: str) -> str:
    return "old__" + name.replace(".", "__")


class NFTPolicy(nn.Module):
    """The LoRA policy and its old copy, one module, so DeepSpeed checkpoints hold both."""

    def __init__(self, denoiser: LensDenoiser, rank: int, alpha: int,
                 targets: list[str]) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.adapter = add_lora(denoiser, rank, alpha, targets)
        params = dict(denoiser.named_parameters())
        for name in self.adapter:
            self.register_buffer(_buffer(name), params[name].detach().clone())

    def forward(self, *packed: Tensor) -> Tensor:
        """The policy's packed forward (``LensDenoiser.forward``)."""
        return self.denoiser(*packed)

    def old(self, *packed: Tensor) -> Tensor:
        """The old policy's packed forward (no gradient)."""
        weights = {n: getattr(self, _buffer(n)) for n in self.adapter}
        with torch.no_grad():
            return functional_call(self.denoiser, weights, packed)

    def base(self, *packed: Tensor) -> Tensor:
        """The frozen base model's packed forward (no gradient): the KL reference."""
        with torch.no_grad(), adapters_off(self.denoiser):
            return self.denoiser(*packed)

    @torch.no_grad()
    def update_old(self, decay: float) -> None:
        """old <- decay old + (1 - decay) policy."""
        params = dict(self.denoiser.named_parameters())
        for name in self.adapter:
            old = getattr(self, _buffer(name))
            old.lerp_(params[name].to(old.dtype), 1.0 - decay)


def normalise_rewards(raw: Tensor, adv_clip: float) -> Tensor:
    """Group rewards (G, K) -> r in [0, 1]: 1/2 + 1/2 clip((raw - mean) / Z, -1, 1) per group,
    Z = adv_clip x the group's std; NaN (a failed judgement) stays NaN and is left out of the
    group's mean and std. A group whose images all scored alike gets 1/2: no signal."""
    valid = ~raw.isnan()
    n = valid.sum(dim=1, keepdim=True).clamp(min=1)
    filled = torch.where(valid, raw, 0.0)
    mean = filled.sum(dim=1, keepdim=True) / n
    var = (torch.where(valid, raw - mean, 0.0) ** 2).sum(dim=1, keepdim=True) / n
    z = adv_clip * var.sqrt()
    r = 0.5 + 0.5 * ((raw - mean) / z.clamp(min=1e-8)).clamp(-1.0, 1.0)
    return torch.where(valid, r, torch.nan)


def nft_loss(v: Tensor, v_old: Tensor, v_base: Tensor, target: Tensor, r: Tensor,
             segment_ids: Tensor, beta: float, kl_weight: float) -> tuple[Tensor, dict]:
    """The DiffusionNFT loss on packed tokens (L, C) with per-sample r (S,); also its parts."""
    positive = (1 - beta) * v_old + beta * v
    negative = (1 + beta) * v_old - beta * v
    pos = velocity_loss(positive, target, r, segment_ids)
    neg = velocity_loss(negative, target, 1 - r, segment_ids)
    kl = velocity_loss(v, v_base, segment_ids=segment_ids)
    loss = (pos + neg) / beta + kl_weight * kl
    parts = {"loss/positive": pos, "loss/negative": neg, "loss/kl": kl}
    return loss, {k: float(v.detach()) for k, v in parts.items()}
