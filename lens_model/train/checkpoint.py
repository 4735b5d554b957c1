"""Training checkpoints: written atomically, pruned to the last K, found again by ``latest``,
and loaded only when every file in them is one this trainer wrote.

One checkpoint is a folder ``step-00001000/`` holding

- ``deepspeed/``: ``engine.save_checkpoint`` output (model, optimizer, LR scheduler). These are
  DeepSpeed's own ``torch.save`` files, read back only by ``engine.load_checkpoint``; engines
  trained beside the main one (companions) save under ``deepspeed/companions/<name>/``;
- ``ema.safetensors``: the EMA shadow (rank 0 writes it; under ZeRO 0-2 all ranks hold the same);
- ``rank-00003.json``: that rank's step, loader state and Python/NumPy RNG states;
- ``rank-00003.safetensors``: that rank's torch CPU (and CUDA) RNG states;
- ``meta.json``: step, world size and file list;
- ``manifest.json``: the SHA-256 and size of every other file, written last.

Everything this module writes itself is JSON or safetensors; nothing of ours is pickled.

Another world size: a checkpoint resumes on as many ranks as wrote it, bit for bit. On a
different number it resumes through DeepSpeed's universal checkpoint when the optimizer state
is partitioned (ZeRO 1-3, or bf16's partitioned fp32 master weights): rank 0 converts the
verified folder into ``.universal-step-N/`` beside it, every rank loads its new shard from
there, and the conversion is removed. Per-rank loader states come back together, for the
batch source to re-deal (``reshard_state``); per-rank RNG states cannot be re-dealt, so the
trainer reseeds them from (seed, rank, step): deterministic, though not the straight run's.

Atomicity: all ranks write into ``.tmp-step-00001000/``; after a barrier rank 0 fsyncs the
tree, writes ``meta.json`` and ``manifest.json`` and renames the folder to ``step-00001000``.
A crash before the rename leaves only a dot-folder, which ``latest`` never returns and the next
save removes, so the previous checkpoint stays the latest. ``ckpt_dir`` must be on a
filesystem every rank sees (DeepSpeed's checkpoints need that too); a rank that cannot see
rank 0's folder fails loudly.

Trust: DeepSpeed's files are pickles, and ``engine.load_checkpoint`` unpickles them with
``weights_only=False``, so a file swapped into a checkpoint folder could run any code on
resume. We cannot make DeepSpeed write safetensors, so :func:`load` refuses everything we did
not write ourselves, before DeepSpeed opens anything:

- at save, every file's SHA-256 and size go into ``manifest.json`` (the ranks hash shares of
  the files in parallel; rank 0 merges them). It is written atomically, last, inside the
  temp folder, so a complete checkpoint always has one;
- at load, the folder must hold exactly the manifest's files: a missing, added (a stray
  ``.pt``/``.bin``/``.pkl``, say), resized or changed file, a symlink, a pickle outside
  ``deepspeed/`` or no manifest at all refuses the checkpoint with
  :class:`UntrustedCheckpoint`, which names the file and the fix. Ranks check shares of the
  hashes and agree (all-reduce) before any of them loads, so all fail together;
- with ``LENS_CHECKPOINT_KEY`` set (a secret from the environment, the same on every rank),
  the manifest also carries an HMAC-SHA256 of its content, and a checkpoint without a valid
  one is refused. The plain manifest catches a file replaced or dropped into the folder; the
  key also stops someone who can write the folder (shared storage, a copied run) from
  rewriting the manifest to match. The key itself is never written anywhere.
"""

from __future__ import annotations

import hashlib
import hmac
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
from lens_model.safe_load import is_pickle
from lens_model.train.ema import EMA

STEP_RE = re.compile(r"^step-(\d{8})$")
DS_TAG = "deepspeed"
META = "meta.json"
MANIFEST = "manifest.json"
EMA_FILE = "ema.safetensors"
KEY_ENV = "LENS_CHECKPOINT_KEY"
_PARTIAL = ".sha256-"  # per-rank hash shares inside the temp folder, merged into the manifest
_CHUNK = 1 << 24


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
    leftovers = (".tmp-", ".old-", ".universal-")
    doomed += [p for p in root.iterdir() if p.is_dir() and p.name.startswith(leftovers)]
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


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (a collective call; this rank's flag alone when
    not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    votes = torch.tensor([int(flag)], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes.item())


# --- the manifest: what this trainer wrote ----------------------------------------------------

class UntrustedCheckpoint(RuntimeError):
    """A checkpoint holds something this trainer did not write; nothing of it was loaded."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(
            f"refusing to resume from {path}: {problem}. Only checkpoints this trainer wrote "
            f"are loaded, because DeepSpeed unpickles its files and a file we did not write "
            f"could run code. Fix: if you did not change it on purpose, delete {path} (the run "
            f"resumes from the previous checkpoint, or starts over when there is none)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    """Every file and symlink under ``root``, relative, sorted (``os.walk`` never follows a
    link, so a linked folder shows as a link, not its content)."""
    out = []
    for folder, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            out.append(os.path.relpath(os.path.join(folder, name), root))
    return sorted(out)


def _share(names: list[str], rank: int, world: int) -> list[str]:
    """The names this rank hashes: every ``world``-th, starting at ``rank``."""
    return names[rank::world]


def _key() -> bytes | None:
    key = os.environ.get(KEY_ENV, "")
    return key.encode() if key else None


def _signature(manifest: dict[str, Any], key: bytes) -> str:
    body = json.dumps({k: v for k, v in manifest.items() if k != "hmac"}, sort_keys=True,
                      separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def _check_manifest(path: Path, rank: int, world: int) -> str:
    """The first problem found with checkpoint ``path`` ("" when none): its manifest, its
    listing, and the hashes of this rank's share of the files."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
        if manifest.get("format") != 1 or manifest.get("algorithm") != "sha256" or not all(
                isinstance(e, dict) and isinstance(e.get("sha256"), str)
                and isinstance(e.get("bytes"), int) for e in files.values()):
            return f"its {MANIFEST} is not a manifest this trainer writes"
    except FileNotFoundError:
        return f"it has no {MANIFEST} (a checkpoint this trainer wrote always has one)"
    except (ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is not a manifest this trainer writes"
    key = _key()
    signed = manifest.get("hmac")
    if key is not None and not signed:
        return f"{MANIFEST} is not signed, but {KEY_ENV} is set, so only signed ones load"
    if key is None and signed:
        return f"{MANIFEST} is signed; set {KEY_ENV} to the key the run was saved with"
    if key is not None and not hmac.compare_digest(str(signed), _signature(manifest, key)):
        return (f"the signature of {MANIFEST} does not match {KEY_ENV} (it was written with "
                f"another key, or edited)")
    listed = [n for n in _files(path) if n != MANIFEST]
    for name in listed:
        if (path / name).is_symlink():
            return f"{name} is a symlink, which this trainer never writes"
        if name not in files:
            kind = "a stray pickle file" if is_pickle(name) else "a file"
            return f"{name} is {kind} not in its {MANIFEST}"
        if is_pickle(name) and not name.startswith(DS_TAG + "/"):
            return f"{name} is a pickle file outside {DS_TAG}/, which this trainer never writes"
    missing = sorted(set(files) - set(listed))
    if missing:
        return f"{missing[0]} is listed in {MANIFEST} but missing"
    for name in listed:
        if (path / name).stat().st_size != files[name]["bytes"]:
            return f"{name} has changed size since it was saved"
    for name in _share(listed, rank, world):
        if sha256_file(path / name) != files[name]["sha256"]:
            return f"{name} has changed since it was saved (its SHA-256 differs)"
    return ""


def verify(path: str | Path) -> None:
    """Raise :class:`UntrustedCheckpoint` unless checkpoint ``path`` holds exactly the files
    this trainer wrote, unchanged (a collective call: each rank hashes a share)."""
    path = Path(path)
    rank, world = _world()
    problem = _check_manifest(path, rank, world)
    if _any_rank(bool(problem)):
        raise UntrustedCheckpoint(path, problem or "another rank found a changed file (see "
                                                   "its error)")


def _hash_share(tmp: Path, rank: int, world: int) -> None:
    """Hash this rank's share of the files in the temp folder into ``.sha256-rank-N.json``."""
    names = [n for n in _files(tmp) if not n.startswith(".")]
    own = {n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size}
           for n in _share(names, rank, world)}
    write_json(tmp / f"{_PARTIAL}{_rank_name(rank)}.json", own)


def _write_manifest(tmp: Path, step: int, world: int) -> None:
    """Rank 0: merge the ranks' hash shares, hash ``meta.json``, write ``manifest.json``."""
    files: dict[str, dict[str, Any]] = {}
    for r in range(world):
        share = tmp / f"{_PARTIAL}{_rank_name(r)}.json"
        files.update(json.loads(share.read_text()))
        share.unlink()
    files[META] = {"sha256": sha256_file(tmp / META), "bytes": (tmp / META).stat().st_size}
    unhashed = set(_files(tmp)) - set(files) - {MANIFEST}
    if unhashed:  # a file appeared after the ranks listed the folder
        raise RuntimeError(f"checkpoint step {step}: {sorted(unhashed)} appeared in {tmp} "
                           f"while it was being hashed; is another job saving there?")
    manifest: dict[str, Any] = {"format": 1, "algorithm": "sha256", "step": step,
                                "files": files}
    key = _key()
    if key is not None:
        manifest["hmac"] = _signature(manifest, key)
    write_json(tmp / MANIFEST, manifest)


# --- save / load ----------------------------------------------------------------------------

def save(ckpt_dir: str | Path, step: int, engine: Any, ema: EMA | None,
         loader_state: dict[str, Any], rng: dict[str, RngState], keep_last: int,
         meta: dict[str, Any] | None = None, companions: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` on every rank (a collective call); returns its folder.

    ``rng`` maps stream names to states (e.g. ``{"train": ..., "data": ...}``); ``meta`` is
    extra JSON stored in ``meta.json``; ``companions`` are further engines trained beside the
    main one (distillation's critic), each saved under ``deepspeed/companions/<name>``.
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
    for name, other in sorted((companions or {}).items()):
        other.save_checkpoint(str(tmp), tag=_companion_tag(name), save_latest=False)

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
    _hash_share(tmp, rank, world)
    _barrier()

    if rank == 0:
        _fsync_tree(tmp)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")
                       if p.is_file() and not p.name.startswith(_PARTIAL))
        write_json(tmp / META, {"step": step, "world_size": world, "ema": ema is not None,
                                "companions": sorted(companions or {}), "files": files,
                                **(meta or {})})
        _write_manifest(tmp, step, world)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step: move the old one aside, then swap in the new
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        _fsync_dir(root)
        prune(root, keep_last)
    _barrier()
    return final


def saved_world_size(path: str | Path) -> int:
    """How many ranks wrote checkpoint ``path``."""
    return int(json.loads((Path(path) / META).read_text())["world_size"])


def partitioned(path: str | Path) -> bool:
    """Whether DeepSpeed split checkpoint ``path``'s optimizer state over the ranks (ZeRO 1-3,
    or bf16's fp32 master weights): then only a universal checkpoint loads it onto another
    world size. Unpartitioned state sits whole in the model-states file, which any world
    size loads."""
    return any(Path(path, DS_TAG).rglob("*optim_states.pt"))


def _to_universal(path: Path, tags: list[str], rank: int) -> Path:
    """Rank 0 converts each engine's folder in verified checkpoint ``path`` to DeepSpeed's
    universal format under ``.universal-step-N/`` beside it (a collective call)."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    out = path.parent / f".universal-{path.name}"
    # inject_missing_state: our modules declare no tensor- or pipeline-parallel layout, which
    # is what DeepSpeed's default universal info (a version number alone) describes.
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        for tag in tags:
            ds_to_universal.main(Namespace(
                input_folder=str(path / tag), output_folder=str(out / tag),
                num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                strict=True, inject_missing_state=True))
    _barrier()
    if not out.is_dir():
        raise RuntimeError(f"rank {rank} cannot see {out}, which rank 0 wrote; put ckpt_dir "
                           f"on a filesystem all ranks share")
    return out


def _companion_tag(name: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"companion engine name {name!r}: use lowercase letters, digits and _")
    return f"{DS_TAG}/companions/{name}"


@dataclass
class Restored:
    """What a checkpoint gives back besides the engine and EMA it loads into."""

    path: Path
    step: int
    loader_state: dict[str, Any]  # this rank's; {} when resharded
    rng: dict[str, RngState]  # this rank's; {} when resharded
    meta: dict[str, Any]
    loader_states: list[dict[str, Any]]  # when resharded: every saving rank's, in rank order
    resharded: bool  # saved by another number of ranks


def load(path: str | Path, engine: Any, ema: EMA | None,
         companions: dict[str, Any] | None = None) -> Restored:
    """Load a checkpoint folder into ``engine``, ``ema`` and ``companions`` on every rank (a
    collective call), after :func:`verify` has found every file in it to be one this trainer
    wrote.

    RNG states come back in ``Restored.rng``; restoring them is the caller's choice. A
    checkpoint of another world size loads when its state is not partitioned, or when the
    engines were built with ``{"checkpoint": {"load_universal": true}}``; then
    ``Restored.resharded`` is set and the caller re-deals ``loader_states``.
    """
    path = Path(path)
    rank, world = _world()
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META}); pass a "
                                f"folder that latest() returns")
    verify(path)  # before DeepSpeed unpickles anything
    meta = json.loads((path / META).read_text())
    saved_world = int(meta["world_size"])
    resharded = saved_world != world
    universal = resharded and partitioned(path)
    if universal and not engine.load_universal_checkpoint():
        raise ValueError(f"{path} was written by {saved_world} ranks with a partitioned "
                         f"optimizer state and this run has {world}; build the engines with "
                         f'{{"checkpoint": {{"load_universal": true}}}} (Trainer does when the '
                         f"newest checkpoint's world size differs) or resume with "
                         f"{saved_world} ranks")
    if ema is not None and not meta["ema"]:
        raise ValueError(f"{path} holds no EMA but this run keeps one; resume with EMA off or "
                         f"from a checkpoint saved with EMA")
    saved = meta.get("companions", [])
    if sorted(companions or {}) != saved:
        raise ValueError(f"{path} holds the engines {['main', *saved]} but this run trains "
                         f"{['main', *sorted(companions or {})]}; resume it with the program "
                         f"that wrote it, or start from a fresh ckpt_dir")
    engines = [(DS_TAG, engine), *((_companion_tag(n), e)
                                   for n, e in sorted((companions or {}).items()))]
    source = _to_universal(path, [t for t, _ in engines], rank) if universal else path
    try:
        for tag, eng in engines:
            loaded, _ = eng.load_checkpoint(str(source), tag=tag, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
            if loaded is None:
                raise FileNotFoundError(f"DeepSpeed found no engine checkpoint under "
                                        f"{source / tag}; the checkpoint is damaged, resume "
                                        f"from an older one")
    finally:
        if universal:
            _barrier()
            if rank == 0:
                shutil.rmtree(source, ignore_errors=True)
    if ema is not None:
        ema.load(path / EMA_FILE)
    if resharded:  # every saving rank's state, for the caller to re-deal
        states = [json.loads((path / f"{_rank_name(r)}.json").read_text())
                  for r in range(saved_world)]
        return Restored(path, int(states[0]["step"]), {}, {}, meta,
                        [s["loader"] for s in states], True)
    own = json.loads((path / f"{_rank_name(rank)}.json").read_text())
    tensors = load_file(str(path / f"{_rank_name(rank)}.safetensors"))
    rng = {name: RngState.from_saved(js, tensors, name) for name, js in own["rng"].items()}
    return Restored(path, int(own["step"]), own["loader"], rng, meta, [], False)
