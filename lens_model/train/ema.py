"""Exponential moving average of a model's trainable weights, kept in fp32.

After each optimizer step, ``shadow = d * shadow + (1 - d) * param`` for every parameter that
requires grad, where d is ``decay`` warmed up over the first updates (``current_decay``).
The shadow is fp32 whatever the model's dtype: in bf16 training it follows the bf16 working
weights, whose rounding noise the average smooths out, and it costs no communication. It lives
beside the weights, or on ``device`` (the CPU), where it costs the GPU nothing: 4 bytes a
parameter, 15 GiB for the 3.8B model. Updates go one tensor at a time, so a bf16 model never
has a second full fp32 copy beside the shadow.

ZeRO stages 0-2 keep the full parameters on every rank, so every rank holds the same shadow
and any one of them can save it. ZeRO-3 partitions the parameters; a full fp32 shadow per rank
would undo the memory ZeRO-3 saves, so EMA refuses ZeRO-3 models (train with ZeRO-2 or turn
EMA off).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lens_model.atomic import atomic_path


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name; refuses ZeRO-3-partitioned ones."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    partitioned = [name for name, p in params.items() if hasattr(p, "ds_id")]
    if partitioned:
        raise ValueError(f"EMA needs full parameters on each rank, but {partitioned[0]!r} (and "
                         f"{len(partitioned) - 1} more) is partitioned by ZeRO-3; use "
                         f"zero_stage <= 2 or set ema_decay to None")
    if not params:
        raise ValueError("EMA: the model has no trainable parameters (none requires grad)")
    return params


class EMA:
    """fp32 shadow of ``model``'s trainable parameters, updated with ``update(model)``."""

    def __init__(self, model: nn.Module, decay: float,
                 device: torch.device | str | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().to(device or p.device, torch.float32, copy=True)
            for name, p in _trainable(model).items()
        }

    def _matched(self, model: nn.Module) -> tuple[list[Tensor], list[nn.Parameter]]:
        """Shadow and model tensors in the same order, checked name for name."""
        params = _trainable(model)
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())
            extra = sorted(params.keys() - self.shadow.keys())
            raise ValueError(f"EMA was built for other parameters: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}; build the EMA from this model")
        names = list(self.shadow)
        return [self.shadow[n] for n in names], [params[n] for n in names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow toward the model's current weights (call after each optimizer step)."""
        shadow, params = self._matched(model)
        weight = 1.0 - self.current_decay
        for s, p in zip(shadow, params, strict=True):
            s.lerp_(p.detach().to(s.device, torch.float32), weight)
        self.updates += 1

    @property
    def current_decay(self) -> float:
        """``decay``, warmed up as min(decay, (1 + n) / (10 + n)) after n updates: early on the
        shadow follows the weights instead of keeping the initialisation for thousands of
        steps (at decay 0.999, 37% of it would still be there after 1000 updates)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into ``model`` (cast to its dtype); for evaluation or export."""
        shadow, params = self._matched(model)
        for s, p in zip(shadow, params, strict=True):
            p.copy_(s)

    @contextmanager
    def swap(self, model: nn.Module) -> Iterator[nn.Module]:
        """Evaluate with the EMA weights inside the block; the trained weights come back after
        (kept meanwhile in host memory, so a GPU never holds two copies)."""
        _, params = self._matched(model)
        backup = [p.detach().to("cpu", copy=True) for p in params]
        try:
            self.copy_to(model)
            yield model
        finally:
            with torch.no_grad():
                for b, p in zip(backup, params, strict=True):
                    p.copy_(b)

    def state_dict(self) -> dict[str, object]:
        """Decay, update count and the shadow tensors (by parameter name)."""
        return {"decay": self.decay, "updates": self.updates,
                "params": {n: t.detach().cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore from :meth:`state_dict`; names and shapes must match this EMA's."""
        params = state.get("params")
        if not isinstance(params, dict):
            raise ValueError("EMA state has no 'params' dict of tensors; pass what "
                             "EMA.state_dict() returned")
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())
            extra = sorted(params.keys() - self.shadow.keys())
            raise ValueError(f"EMA state does not fit this model: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}; load the state saved for this model")
        for name, tensor in params.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state {name!r} has shape {tuple(tensor.shape)}, the model "
                                 f"{tuple(self.shadow[name].shape)}; load the matching state")
            self.shadow[name].copy_(tensor)
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        self.updates = int(state["updates"])  # type: ignore[call-overload]

    def save(self, path: str | Path) -> None:
        """Write the shadow as safetensors (decay and updates in its metadata), atomically."""
        state = self.state_dict()
        meta = {"decay": repr(self.decay), "updates": str(self.updates)}
        with atomic_path(path) as tmp:
            save_file(state["params"], str(tmp), metadata=meta)  # type: ignore[arg-type]

    def load(self, path: str | Path) -> None:
        """Restore from a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if "decay" not in meta or "updates" not in meta:
            raise ValueError(f"{path} has no EMA metadata (decay, updates); it was not written "
                             f"by EMA.save")
        self.load_state_dict({"decay": float(meta["decay"]), "updates": int(meta["updates"]),
                              "params": load_file(str(path))})
