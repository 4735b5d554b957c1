"""A tiny DeepSpeed training run for the engine tests: one process, or under torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/ds_worker.py --out OUT --zero 2 \\
        --job straight:CKPT_A:8 --job half:CKPT_B:4

Each ``--job TAG:CKPT:STEPS`` trains a fresh :class:`TinyNet` (dropout, so RNG state
matters) on :class:`RandomBatches` up to STEPS, resuming from CKPT when it holds a
checkpoint, then writes each rank's final parameters and EMA to ``OUT/TAG-rank{r}.safetensors``
and its loader state, losses and timings to ``OUT/TAG-rank{r}.json``. Jobs run one after the
other in the same process; a resume "after a kill" is a job in a later process.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lens_model.train.engine import TrainConfig, Trainer  # noqa: E402


class TinyNet(nn.Module):
    """8 -> 32 -> 1 MLP with dropout; optional activation checkpointing."""

    def __init__(self, d_in: int = 8, hidden: int = 32, p_drop: float = 0.3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(p_drop),
                                  nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(p_drop))
        self.head = nn.Linear(hidden, 1)
        self.checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        self.checkpointing = True

    def forward(self, x: Tensor) -> Tensor:  # (B, d_in) -> (B, 1)
        if self.checkpointing and self.training:
            h = checkpoint(self.body, x, use_reentrant=False)
        else:
            h = self.body(x)
        return self.head(h)


class RandomBatches:
    """Endless stateful batches that also use the global RNGs, as real loaders do.

    Starting an iteration draws from torch's global RNG (as ``DataLoader`` does for its worker
    seed) without using the result, and each batch gets a little NumPy global-RNG jitter. An
    exact resume needs the trainer to keep both draws off its training RNG stream and to
    save and restore the data stream's NumPy state.
    """

    def __init__(self, seed: int, rank: int = 0, batch: int = 16, d_in: int = 8) -> None:
        self.seed, self.rank, self.batch, self.d_in = seed, rank, batch, d_in
        self.index = 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        torch.rand(())  # as DataLoader draws its base seed when an iterator starts
        while True:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 10_007
                                                + self.index)
            x = torch.randn(self.batch, self.d_in, generator=gen)
            x = x + 0.01 * torch.from_numpy(np.random.standard_normal(x.shape)).float()
            y = torch.sin(x).sum(dim=1, keepdim=True)  # (B, 1)
            self.index += 1
            yield x, y

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["seed"], state["rank"]) != (self.seed, self.rank):
            raise ValueError(f"batch state is for seed/rank {state['seed']}/{state['rank']}, "
                             f"this source is {self.seed}/{self.rank}")
        self.index = int(state["index"])

    def reshard_state(self, states: list[dict[str, Any]], rank: int, world_size: int
                      ) -> dict[str, Any]:
        """Every rank draws its own stream, so a new rank continues at the step reached."""
        return {"index": max(int(s["index"]) for s in states), "seed": self.seed, "rank": rank}


def mse_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    device = next(model.parameters()).device
    return F.mse_loss(model(x.to(device)).float(), y.to(device))


def config(ckpt: str | None, zero: int = 0, **kw: Any) -> TrainConfig:
    """The test runs' TrainConfig: warmup, weight decay and EMA all on."""
    base = dict(lr=3e-3, warmup_steps=3, weight_decay=0.01, grad_clip=0.5, zero_stage=zero,
                ema_decay=0.9, ckpt_every=2, keep_last=2, ckpt_dir=ckpt, seed=7)
    return TrainConfig(**{**base, **kw})


def run(ckpt: str | None, steps: int, zero: int = 0, model_seed: int = 0,
        **kw: Any) -> tuple[Trainer, RandomBatches, list[dict[str, float]]]:
    """Build model, batches and trainer, train to ``steps``; the per-step metrics come back."""
    torch.manual_seed(model_seed)
    model = TinyNet()
    trainer = Trainer(model, mse_loss, config(ckpt, zero, **kw))
    batches = RandomBatches(seed=3, rank=trainer.rank)
    log: list[dict[str, float]] = []
    trainer.fit(batches, steps, on_step=lambda s, m: log.append({"step": s, **m}))
    return trainer, batches, log


def final_state(trainer: Trainer) -> dict[str, Tensor]:
    """Parameters, EMA shadow and (under ZeRO, gathered whole) Adam moments as one flat dict
    of CPU fp32 tensors (a collective call)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    out = {f"param.{n}": p.detach().float().cpu().contiguous()
           for n, p in trainer.module.named_parameters()}
    if trainer.ema is not None:
        out.update({f"ema.{n}": t.cpu() for n, t in trainer.ema.shadow.items()})
    if trainer.config.zero_stage > 0:
        for n, p in trainer.module.named_parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"adam.{key}.{n}"] = safe_get_full_optimizer_state(p, key).float().cpu()
    return out


def main() -> None:
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--job", action="append", required=True,
                    help="TAG:CKPT_DIR:STEPS (an empty CKPT_DIR: no checkpoints)")
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--model-seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for job in args.job:
        tag, ckpt, steps = job.rsplit(":", 2)
        trainer, batches, log = run(ckpt or None, int(steps), args.zero, args.model_seed)
        name = f"{tag}-rank{trainer.rank}"
        save_file(final_state(trainer), str(out / f"{name}.safetensors"))
        step_s = [m["step_s"] for m in log[1:]] or [m["step_s"] for m in log]
        (out / f"{name}.json").write_text(json.dumps({
            "rank": trainer.rank, "world_size": trainer.world_size, "step": trainer.step,
            "loader": batches.state_dict(), "losses": [m["loss"] for m in log],
            "resumed_from": str(trainer.resumed_from) if trainer.resumed_from else None,
            "init_s": trainer.init_s, "step_s": sum(step_s) / max(len(step_s), 1)}))


if __name__ == "__main__":
    main()
