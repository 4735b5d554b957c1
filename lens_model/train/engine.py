"""The DeepSpeed trainer: one engine on every path, from one CPU process to many GPU nodes.

``Trainer(model, loss_fn, config)`` wraps ``model`` in ``deepspeed.initialize`` with a config
built from ``infra/deepspeed/zero{N}.json`` plus the :class:`TrainConfig` values (AdamW through
DeepSpeed with ``torch_adam``, gradient clipping, bf16 or fp32), adds a linear warmup then
constant LR (optionally a linear cooldown at the end), keeps an fp32 EMA, and checkpoints
every ``ckpt_every`` steps. ``fit`` resumes from the newest complete checkpoint and continues
bit for bit: parameters, optimizer, LR schedule, EMA, the batch iterator's position and every
RNG stream come back.

Two RNG streams keep resumes exact: the training stream (dropout, noise, timesteps drawn in
``loss_fn``) and a data stream that is swapped in while the batch iterator runs, so a loader
that draws from the global RNGs (``torch.utils.data.DataLoader`` does when it starts) does not
shift the training stream. Both are saved per rank.

A checkpoint written by another number of ranks resumes too (a node lost, or more added):
weights, optimizer state (through DeepSpeed's universal checkpoint when it is partitioned),
LR schedule and EMA come back whole; the batch source re-deals its position
(``reshard_state``) and the RNG streams are reseeded from (seed, rank, step).

Launch (the same script everywhere)::

    python train.py ...                                          # one process (gloo on CPU)
    python -m torch.distributed.run --nproc_per_node 8 train.py  # one node
    python -m torch.distributed.run --nnodes 2 --node_rank R --nproc_per_node 8 \\
        --master_addr HOST --master_port 29500 train.py          # several nodes

``DS_ACCELERATOR=cpu`` runs on CPU with gloo (DeepSpeed's CPU accelerator picks gloo when
oneCCL is not installed); its first initialize JIT-builds ``deepspeed_shm_comm`` into
``$TORCH_EXTENSIONS_DIR``.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from lens_model.recipe import merged
from lens_model.train import checkpoint
from lens_model.train.checkpoint import RngState
from lens_model.train.ema import EMA

LossFn = Callable[[nn.Module, Any], Tensor]
OnStep = Callable[[int, dict[str, float]], None]
OnSave = Callable[[int, Path], None]
_END = object()  # what next() returns once the batch iterator is exhausted
_DIST_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


def ds_config_dir() -> Path:
    """Where ``zero{0,1,2,3}.json`` live: ``$LENS_DS_CONFIG_DIR`` or ``infra/deepspeed``."""
    env = os.environ.get("LENS_DS_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "infra" / "deepspeed"


@dataclass
class TrainConfig:
    """What the trainer needs; field names follow the recipe's ``pretrain`` section."""

    lr: float = 2e-4
    warmup_steps: int = 0
    decay_steps: int = 0  # linear cooldown to 0 over the last decay_steps of total_steps
    total_steps: int = 0  # needed only with decay_steps
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    zero_stage: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_checkpointing: bool = False
    ema_decay: float | None = 0.999  # None: no EMA
    ema_device: Literal["same", "cpu"] = "same"  # the shadow beside the weights or on the host
    grad_accum: int = 1  # micro-batches per optimizer step
    ckpt_every: int = 1000
    keep_last: int = 3
    ckpt_dir: str | Path | None = None  # None: no checkpoints, no resume
    seed: int = 0
    resume: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, "lr", "must be > 0"),
            (self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
            (self.decay_steps == 0 or 0 < self.decay_steps <= self.total_steps
             - self.warmup_steps,
             "decay_steps", "must be in [0, total_steps - warmup_steps] (set total_steps)"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
             "must be two numbers in [0, 1)"),
            (self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 turns clipping off)"),
            (self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3"),
            (self.precision in ("fp32", "bf16"), "precision", "must be 'fp32' or 'bf16'"),
            (self.ema_decay is None or 0 <= self.ema_decay < 1, "ema_decay",
             "must be in [0, 1) or None"),
            (self.ckpt_every >= 1, "ckpt_every", "must be >= 1"),
            (self.ema_device in ("same", "cpu"), "ema_device", "must be 'same' or 'cpu'"),
            (self.grad_accum >= 1, "grad_accum", "must be >= 1"),
            (self.keep_last >= 1, "keep_last", "must be >= 1"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name} {rule}, got {getattr(self, name)!r}")
        if self.zero_stage == 3 and self.ema_decay is not None:
            raise ValueError("TrainConfig: EMA needs full parameters on each rank, which ZeRO-3 "
                             "does not keep; use zero_stage <= 2 or ema_decay=None")


def build_ds_config(config: TrainConfig, overrides: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """``zero{stage}.json`` with ``config``'s optimizer, clipping and precision, then overrides."""
    path = ds_config_dir() / f"zero{config.zero_stage}.json"
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} is missing; restore infra/deepspeed or "
                                f"point LENS_DS_CONFIG_DIR at a folder with zero0..zero3.json")
    base = json.loads(path.read_text())
    owned = {
        "zero_optimization": {"stage": config.zero_stage},
        "gradient_accumulation_steps": config.grad_accum,
        "gradient_clipping": float(config.grad_clip),
        "bf16": {"enabled": config.precision == "bf16"},
        "optimizer": {"type": "AdamW", "params": {
            "lr": config.lr, "betas": list(config.betas), "weight_decay": config.weight_decay,
            "torch_adam": True, "adam_w_mode": True}},
    }
    return merged(merged(base, owned), overrides or {})


def _check_agrees(ds: dict[str, Any], config: TrainConfig) -> None:
    """Refuse a DeepSpeed config that contradicts the TrainConfig on what the latter owns."""
    want = build_ds_config(config)
    # DeepSpeed's value when the key is absent (None: it has no default, the key is needed)
    paths = {("zero_optimization", "stage"): 0, ("gradient_accumulation_steps",): 1,
             ("gradient_clipping",): 0.0,
             ("bf16", "enabled"): False, ("optimizer", "type"): None,
             ("optimizer", "params", "lr"): None, ("optimizer", "params", "betas"): None,
             ("optimizer", "params", "weight_decay"): None}
    for keys, default in paths.items():
        got, exp = ds, want
        for k in keys:
            got = got.get(k) if isinstance(got, dict) else None
            exp = exp[k]
        got = default if got is None else got
        if got is not None and isinstance(exp, list):
            got = list(got)
        if got != exp:
            raise ValueError(f"ds_config {'.'.join(keys)} = {got!r} contradicts the TrainConfig "
                             f"({exp!r}); set it in TrainConfig, or build the dict with "
                             f"build_ds_config(config, overrides)")
    if ds.get("fp16", {}).get("enabled"):
        raise ValueError("ds_config fp16.enabled: the trainer supports fp32 and bf16 only; "
                         "set TrainConfig.precision='bf16'")
    if "scheduler" in ds:
        raise ValueError("ds_config has a 'scheduler'; the trainer sets the LR schedule "
                         "from TrainConfig.warmup_steps and decay_steps, so remove it")


def init_distributed() -> tuple[int, int]:
    """Join the launcher's process group (env://), or make a one-process world; (rank, size).

    A launcher (torchrun, deepspeed) sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and
    LOCAL_RANK. Without them this is one process: its group needs no rendezvous, so it is
    built on an in-memory store, with no port to pick and nothing left in the environment for
    child processes to trip over (LOCAL_RANK=0 is set, as DeepSpeed's engine reads it).
    """
    import deepspeed

    if not dist.is_initialized():
        present = [k for k in _DIST_ENV if k in os.environ]
        if "WORLD_SIZE" in os.environ:
            missing = [k for k in _DIST_ENV if k not in os.environ]
            if missing:
                raise RuntimeError(f"WORLD_SIZE is set but {', '.join(missing)} is not; launch "
                                   f"with torchrun/deepspeed, or unset {', '.join(present)} "
                                   f"to run as one process")
            deepspeed.init_distributed()
        else:
            from deepspeed.accelerator import get_accelerator

            os.environ.setdefault("LOCAL_RANK", "0")
            backend = get_accelerator().communication_backend_name()
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def seed_everything(seed: int, rank: int = 0, stream: int = 0, step: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from (seed, rank, stream), distinct per rank;
    a ``step`` > 0 (a resume onto another world size) gives fresh streams from there."""
    entropy = [seed, rank, stream] + ([step] if step else [])
    py, npy, th = np.random.SeedSequence(entropy).generate_state(3)
    random.seed(int(py))
    np.random.seed(int(npy))
    torch.manual_seed(int(th))


def lr_multiplier(warmup_steps: int, total_steps: int = 0,
                  decay_steps: int = 0) -> Callable[[int], float]:
    """LR multiplier at step k: (k + 1) / warmup for the first ``warmup_steps`` steps, then 1,
    then (with ``decay_steps``) linearly to 0 at ``total_steps``: warmup-stable-decay, whose
    cooldown gives a short run much of a long run's gain."""
    def f(k: int) -> float:
        warm = min(1.0, (k + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if decay_steps <= 0:
            return warm
        return min(warm, max(0.0, (total_steps - k) / decay_steps))
    return f


class StepCounted:
    """A batch source whose draws follow from (seed, step, rank): its state is the step count,
    the same on every rank, so a run of any world size continues from it."""

    step: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])

    def reshard_state(self, states: list[dict[str, int]], rank: int, world_size: int
                      ) -> dict[str, int]:
        steps = {int(s["step"]) for s in states}
        if len(steps) != 1:
            raise ValueError(f"the saved ranks stopped at different steps {sorted(steps)}; "
                             f"lockstep training never does, so the checkpoint is damaged")
        return {"step": steps.pop()}


class Trainer:
    """Trains ``model`` on ``loss_fn(engine, batch)`` through a DeepSpeed engine.

    ``loss_fn`` gets the engine (an ``nn.Module`` that forwards to ``model``; attributes
    pass through) and a batch; it moves the batch to ``trainer.device`` and returns a
    scalar loss. In bf16 the loss runs under ``torch.autocast(bfloat16)``, so float32 inputs
    meet bf16 weights safely.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, config: TrainConfig,
                 ds_config: dict[str, Any] | None = None) -> None:
        import deepspeed

        self.config, self.loss_fn = config, loss_fn
        ds = build_ds_config(config) if ds_config is None else ds_config
        _check_agrees(ds, config)
        if config.grad_checkpointing:
            if not hasattr(model, "enable_gradient_checkpointing"):
                raise ValueError(f"TrainConfig.grad_checkpointing is on but "
                                 f"{type(model).__name__} has no enable_gradient_checkpointing()"
                                 f"; turn it off or give the model that method")
            model.enable_gradient_checkpointing()
        start = time.perf_counter()
        self.rank, self.world_size = init_distributed()
        # DeepSpeed reads a partitioned optimizer state of another world size only through a
        # universal checkpoint, and only when the engine is built for it.
        newest = checkpoint.latest(config.ckpt_dir) if config.ckpt_dir and config.resume \
            else None
        self._universal = {"checkpoint": {"load_universal": True}} if newest is not None \
            and checkpoint.saved_world_size(newest) != self.world_size \
            and checkpoint.partitioned(newest) else {}
        ds = merged(ds, self._universal)
        seed_everything(config.seed, self.rank, stream=1)
        self._data_rng = RngState.capture(cuda=False)
        seed_everything(config.seed, self.rank, stream=0)
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds, lr_scheduler=lambda opt: LambdaLR(
                opt, lr_multiplier(config.warmup_steps, config.total_steps, config.decay_steps)))
        self.init_s = time.perf_counter() - start  # process group + deepspeed.initialize
        self.device: torch.device = self.engine.device
        self.accum = int(self.engine.gradient_accumulation_steps())
        self.ema = None if config.ema_decay is None else EMA(
            self.engine.module, config.ema_decay,
            "cpu" if config.ema_device == "cpu" else None)
        self.step = 0
        # More state for checkpoints: name -> an object with JSON state_dict()/load_state_dict()
        # (the compute ledger, say), saved in meta.json and restored on resume.
        self.stateful: dict[str, Any] = {}
        # Engines trained beside the main one, by the loss or step callbacks (distillation's
        # critic): checkpointed and restored with it.
        self.companions: dict[str, Any] = {}
        self.resumed_from: Path | None = None
        self._restored = False
        self._saved_step: int | None = None

    def add_companion(self, name: str, model: nn.Module, config: TrainConfig,
                      param_groups: list[dict[str, Any]] | None = None) -> Any:
        """A second DeepSpeed engine for ``model`` (AdamW, clipping and precision from
        ``config``; ``param_groups`` may give groups their own ``lr``), saved and restored with
        this trainer's checkpoints. Add companions before ``restore``/``fit``."""
        import deepspeed

        if self._restored:
            raise RuntimeError(f"add companion {name!r} before restore() or fit(): a resume "
                               f"already happened without it")
        ds = build_ds_config(config, self._universal)
        _check_agrees(ds, config)
        params = param_groups or [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=params, config=ds,
            lr_scheduler=lambda opt: LambdaLR(opt, lr_multiplier(config.warmup_steps)))
        self.companions[name] = engine
        return engine

    @property
    def module(self) -> nn.Module:
        """The trained model itself (ZeRO 0-2: full weights on every rank)."""
        return self.engine.module

    @contextmanager
    def _data_stream(self) -> Iterator[None]:
        """Run the batch iterator on the data RNG stream, leaving the training stream alone."""
        train = RngState.capture(cuda=False)
        self._data_rng.restore()
        try:
            yield
        finally:
            self._data_rng = RngState.capture(cuda=False)
            train.restore()

    def _stateful(self, batches: Any) -> None:
        for name in ("state_dict", "load_state_dict"):
            if not callable(getattr(batches, name, None)):
                raise TypeError(f"checkpointing needs a batch source with state_dict() and "
                                f"load_state_dict() (like PackedLoader); {type(batches).__name__}"
                                f" has no {name}()")

    def restore(self, batches: Any) -> int:
        """Resume from the newest checkpoint in ``ckpt_dir`` if any (once); returns the step."""
        if self._restored:
            return self.step
        self._restored = True
        cfg = self.config
        path = checkpoint.latest(cfg.ckpt_dir) if cfg.ckpt_dir and cfg.resume else None
        if path is None:
            return self.step
        self._stateful(batches)
        saved_world = checkpoint.saved_world_size(path)
        if saved_world != self.world_size and not callable(getattr(batches, "reshard_state",
                                                                    None)):
            raise TypeError(f"{path} was written by {saved_world} ranks and this run has "
                            f"{self.world_size}; {type(batches).__name__} has no "
                            f"reshard_state(states, rank, world) to re-deal its position, so "
                            f"resume with {saved_world} ranks")
        got = checkpoint.load(path, self.engine, self.ema, self.companions)
        if got.resharded:
            batches.load_state_dict(batches.reshard_state(got.loader_states, self.rank,
                                                          self.world_size))
            seed_everything(cfg.seed, self.rank, stream=1, step=got.step)
            self._data_rng = RngState.capture(cuda=False)
            seed_everything(cfg.seed, self.rank, stream=0, step=got.step)
        else:
            batches.load_state_dict(got.loader_state)
            got.rng["train"].restore()
            self._data_rng = got.rng.get("data", self._data_rng)
        saved = got.meta.get("state", {})
        for name, obj in self.stateful.items():
            if name not in saved:
                raise ValueError(f"{path} holds no {name!r} state (it has {sorted(saved)}); "
                                 f"it was written without it, so resume from a fresh ckpt_dir")
            obj.load_state_dict(saved[name])
        self.step, self.resumed_from, self._saved_step = got.step, path, got.step
        return self.step

    def save(self, batches: Any) -> Path:
        """Checkpoint now (every rank calls it): engine, EMA, loader state, step, RNG."""
        if self.config.ckpt_dir is None:
            raise ValueError("TrainConfig.ckpt_dir is None; set it to save checkpoints")
        self._stateful(batches)
        rng = {"train": RngState.capture(), "data": self._data_rng}
        path = checkpoint.save(self.config.ckpt_dir, self.step, self.engine, self.ema,
                               batches.state_dict(), rng, self.config.keep_last,
                               meta={"zero_stage": self.config.zero_stage,
                                     "precision": self.config.precision,
                                     "state": {k: v.state_dict()
                                               for k, v in self.stateful.items()}},
                               companions=self.companions)
        self._saved_step = self.step
        return path

    def autocast(self) -> torch.autocast:
        """bf16 autocast on this trainer's device when its precision is bf16, else a no-op:
        for the loss, and for anything else that runs the (bf16) model, like sample grids."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.config.precision == "bf16")

    def _loss(self, batch: Any) -> Tensor:
        with self.autocast():
            loss = self.loss_fn(self.engine, batch)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise TypeError(f"loss_fn must return a scalar tensor, got "
                            f"{type(loss).__name__} {getattr(loss, 'shape', '')}")
        return loss

    def fit(self, batches: Iterable[Any], steps: int, on_step: OnStep | None = None,
            on_save: OnSave | None = None) -> int:
        """Train until ``steps`` optimizer steps in total (resumed ones count); returns the step.

        Each step takes ``gradient_accumulation_steps`` batches. ``on_step(step, metrics)``
        runs on every rank after each step; metrics hold the loss averaged over ranks and
        micro-batches, the LR used, the step time and the grad norm when DeepSpeed reports it
        (ZeRO 1-3 and bf16 do). With ``ckpt_dir`` set, a checkpoint is written every
        ``ckpt_every`` steps and once more at the end if the last step was not saved;
        ``on_save(step, path)`` runs on every rank once each is complete on disk.
        """
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        cfg = self.config
        if cfg.ckpt_dir is not None:
            self._stateful(batches)
        self.restore(batches)
        self.engine.train()
        with self._data_stream():
            stream = iter(batches)
        while self.step < steps:
            start = time.perf_counter()
            lr = float(self.engine.get_lr()[0])
            total = torch.zeros((), device=self.device)
            for _ in range(self.accum):
                with self._data_stream():
                    batch = next(stream, _END)
                if batch is _END:
                    raise RuntimeError(f"the batch iterator ran out at step {self.step}; give "
                                       f"an endless one (PackedLoader is) or train fewer steps")
                loss = self._loss(batch)
                self.engine.backward(loss)
                self.engine.step()
                total += loss.detach().float()
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.engine.module)
            if self.world_size > 1:
                dist.all_reduce(total)
            metrics = {"loss": total.item() / (self.accum * self.world_size), "lr": lr,
                       "step_s": time.perf_counter() - start}
            norm = self.engine.get_global_grad_norm()
            if norm is not None:
                metrics["grad_norm"] = float(norm)
            if on_step is not None:
                on_step(self.step, metrics)
            if cfg.ckpt_dir is not None and self.step % cfg.ckpt_every == 0:
                self._save_and_tell(batches, on_save)
        if cfg.ckpt_dir is not None and self.step > 0 and self._saved_step != self.step:
            self._save_and_tell(batches, on_save)
        return self.step

    def _save_and_tell(self, batches: Any, on_save: OnSave | None) -> None:
        path = self.save(batches)
        if on_save is not None:
            on_save(self.step, path)

