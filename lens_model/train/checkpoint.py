"""Training checkpoints: written atomically, pruned to the last K, found again by ``latest``.

One checkpoint is a folder ``step-00001000/`` holding

- ``deepspeed/``: ``engine.save_checkpoint`` output (model, optimizer, LR scheduler). These are
  DeepSpeed's own ``torch.save`` files, read back only by ``engine.load_checkpoint``;
- ``ema.safetensors``: the EMA shadow (rank 0 writes it; under ZeRO 0-2 all ranks hold the same);
- ``rank-00003.json``: that rank's step, loader state and Python/NumPy RNG states;
- ``rank-00003.safetensors``: that rank's torch CPU (and CUDA) RNG states;
- ``meta.json``: step, world size and file list, written last.

Everything this module writes itself is JSON or safetensors; nothing of ours is pickled.

Atomicity: all ranks write into ``.tmp-step-00001000/``; after a barrier rank 0 fsyncs the
tree, writes ``meta.json`` and renames the folder to ``step-00001000``. A crash before the
rename leaves only a dot-folder, which ``latest`` never returns and the next save removes, so
the previous checkpoint stays the latest. ``ckpt_dir`` must be on a filesystem every rank sees
(DeepSpeed's checkpoints need that too); a rank that cannot see rank 0's folder fails loudly.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor

from lens_model.atomic import atomic_path, write_json
from lens_model.train.ema import EMA

STEP_RE = re.compile(r"^step-(\d{8})$")
DS_TAG = "deepspeed"
META = "meta.json"
EMA_FILE = "ema.safetensors"


def step_dir(ckpt_dir: str | Path, step: int) -> Path:
    """The folder a checkpoint of ``step`` lives in once complete."""
    return Path(ckpt_dir) / f"step-{step:08d}"


def step_of(path: str | Path) -> int:
    """The step a checkpoint folder holds."""
    match = STEP_RE.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder (expected a name like step-00001000)")
    return int(match.group(1))


def complete(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``ckpt_dir``, oldest first (temp and partial folders skipped)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and STEP_RE.match(p.name) and (p / META).is_file()]
    return sorted(found, key=step_of)


def latest(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``ckpt_dir``, or None."""
    found = complete(ckpt_dir)
    return found[-1] if found else None


def prune(ckpt_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and leftover temp folders."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(ckpt_dir)
    doomed = complete(root)[:-keep_last]
    doomed += [p for p in root.iterdir() if p.is_dir() and p.name.startswith((".tmp-", ".old-"))]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# --- RNG states -----------------------------------------------------------------------------

@dataclass
class RngState:
    """The global RNG states of Python ``random``, NumPy, torch CPU and (optionally) CUDA."""

    python: tuple[Any, ...]
    numpy: tuple[Any, ...]
    torch_cpu: Tensor
    torch_cuda: Tensor | None = None

    @classmethod
    def capture(cls, cuda: bool = True) -> RngState:
        """The current global states (CUDA: the current device's, when CUDA is in use)."""
        with_cuda = cuda and torch.cuda.is_available() and torch.cuda.is_initialized()
        return cls(random.getstate(), np.random.get_state(legacy=True), torch.get_rng_state(),
                   torch.cuda.get_rng_state() if with_cuda else None)

    def restore(self) -> None:
        """Make these the global states."""
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state(self.torch_cuda)

    def to_json(self) -> dict[str, Any]:
        """Python and NumPy states as JSON (the torch ones go to safetensors)."""
        version, internal, gauss = self.python
        kind, keys, pos, has_gauss, cached = self.numpy
        return {"python": [version, list(internal), gauss],
                "numpy": [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss),
                          float(cached)]}

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        out = {f"{prefix}.torch_cpu": self.torch_cpu}
        if self.torch_cuda is not None:
            out[f"{prefix}.torch_cuda"] = self.torch_cuda.cpu()
        return out

    @classmethod
    def from_saved(cls, js: dict[str, Any], tensors: dict[str, Tensor], prefix: str) -> RngState:
        version, internal, gauss = js["python"]
        kind, keys, pos, has_gauss, cached = js["numpy"]
        return cls((version, tuple(internal), gauss),
                   (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
                   tensors[f"{prefix}.torch_cpu"], tensors.get(f"{prefix}.torch_cuda"))


# --- distributed helpers --------------------------------------------------------------------

def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (DeepSpeed's writes do not)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rank_name(rank: int) -> str:
    return f"rank-{rank:05d}"


# --- save / load ----------------------------------------------------------------------------

def save(ckpt_dir: str | Path, step: int, engine: Any, ema: EMA | None,
         loader_state: dict[str, Any], rng: dict[str, RngState], keep_last: int,
         meta: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` on every rank (a collective call); returns its folder.

    ``rng`` maps stream names to states (e.g. ``{"train": ..., "data": ...}``); ``meta`` is
    extra JSON stored in ``meta.json``.
    """
    rank, world = _world()
    root = Path(ckpt_dir)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed save of this step
        tmp.mkdir()
    _barrier()
    if not tmp.is_dir():
        raise RuntimeError(f"rank {rank} cannot see {tmp}, which rank 0 created; put ckpt_dir "
                           f"on a filesystem all ranks share")
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)

    try:
        own = json.dumps({"step": step, "rank": rank, "world_size": world,
                          "loader": loader_state,
                          "rng": {name: s.to_json() for name, s in rng.items()}},
                         sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint step {step}, rank {rank}: the loader state is not "
                        f"JSON-serialisable ({exc}); its state_dict() must return plain "
                        f"dicts, lists, strings and numbers") from exc
    tensors: dict[str, Tensor] = {}
    for name, state in rng.items():
        tensors.update(state.tensors(name))
    with atomic_path(tmp / f"{_rank_name(rank)}.safetensors") as path:
        save_file(tensors, str(path))
    with atomic_path(tmp / f"{_rank_name(rank)}.json") as path:
        path.write_text(own + "\n")
    if rank == 0 and ema is not None:
        ema.save(tmp / EMA_FILE)
    _barrier()

    if rank == 0:
        _fsync_tree(tmp)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        write_json(tmp / META, {"step": step, "world_size": world, "ema": ema is not None,
                                "files": files, **(meta or {})})
        if final.exists():  # re-saving a step: move the old one aside, then swap in the new
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        _fsync_dir(root)
        prune(root, keep_last)
    _barrier()
    return final


@dataclass
class Restored:
    """What a checkpoint gives back besides the engine and EMA it loads into."""

    path: Path
    step: int
    loader_state: dict[str, Any]
    rng: dict[str, RngState]
    meta: dict[str, Any]


def load(path: str | Path, engine: Any, ema: EMA | None) -> Restored:
    """Load a checkpoint folder into ``engine`` and ``ema`` on every rank (a collective call).

    RNG states come back in ``Restored.rng``; restoring them is the caller's choice.
    """
    path = Path(path)
    rank, world = _world()
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META}); pass a "
                                f"folder that latest() returns")
    meta = json.loads((path / META).read_text())
    if meta["world_size"] != world:
        raise ValueError(f"{path} was written by {meta['world_size']} ranks but this run has "
                         f"{world}; resume with {meta['world_size']} ranks (per-rank loader and "
                         f"RNG states cannot be re-dealt)")
    if ema is not None and not meta["ema"]:
        raise ValueError(f"{path} holds no EMA but this run keeps one; resume with EMA off or "
                         f"from a checkpoint saved with EMA")
    loaded, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise FileNotFoundError(f"DeepSpeed found no engine checkpoint under {path / DS_TAG}; "
                                f"the checkpoint is damaged, resume from an older one")
    if ema is not None:
        ema.load(path / EMA_FILE)
    own = json.loads((path / f"{_rank_name(rank)}.json").read_text())
    tensors = load_file(str(path / f"{_rank_name(rank)}.safetensors"))
    rng = {name: RngState.from_saved(js, tensors, name) for name, js in own["rng"].items()}
    return Restored(path, int(own["step"]), own["loader"], rng, meta)
