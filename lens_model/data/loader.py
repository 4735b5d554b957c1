"""The packed, mixed-resolution, stateful loader over tar shards and their manifest.

Plan (from the manifest alone, so it is cheap and exact to resume):
1. Each epoch shuffles the manifest rows with ``numpy.random.default_rng([seed, epoch])``.
2. The shuffled rows are cut into ceil(rows / shuffle_buffer) consecutive windows of near-equal
   size (each <= ``shuffle_buffer``, so no short last window packs badly). Each window is
   packed with :func:`pack_by_tokens` into batches of <= ``token_budget`` image tokens, and the
   window's batches are put in a random order (packing groups samples of similar size).
3. Ranks are dealt the epoch's batches round robin: rank r takes batches r, r + world_size, ...
   All ranks compute the same plan, so their batches are disjoint. The last
   ``batches % world_size`` batches are dropped so every rank gets the same number; their
   rows are skipped this epoch only (the next epoch reshuffles).

Iteration is an infinite stream: epoch after epoch, each :class:`Batch` tagged with its
``epoch`` and ``index`` (within this rank's epoch). Take what you need with
``itertools.islice``; ``batches_in_epoch(epoch)`` says how many an epoch holds (it can differ
a little between epochs, as packing depends on the shuffle). One iteration at a time per
loader: a new ``iter()`` resumes from the current state.

Decoding runs in ``num_workers`` processes through a ``torch.utils.data.DataLoader`` whose
sampler yields plan entries in order; the DataLoader returns results in sampler order, so the
batches are the same for any ``num_workers``. Each process opens shards lazily and reads
members at offsets from :func:`index_shard`. ``state_dict()`` records the next batch to yield,
so a new loader given ``load_state_dict(state)`` continues exactly where the old one stopped.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lens_model.buckets import Bucket, fit_to_bucket
from lens_model.data.shards import MANIFEST, image_member, index_shard
from lens_model.packing import pack_by_tokens

_STATE_FIELDS = ("seed", "rank", "world_size", "token_budget", "token_px", "shuffle_buffer",
                 "manifest")


@dataclass
class Batch:
    """One packed batch of samples at mixed resolutions."""

    keys: list[str]
    captions: list[str]
    short_captions: list[str | None]
    images: list[Tensor]  # each (3, h, w) float32 in [-1, 1], h x w = its bucket
    grids: list[tuple[int, int]]  # (h // token_px, w // token_px) per sample
    buckets: list[str]  # bucket name "WxH" per sample
    epoch: int
    index: int  # position in this rank's epoch

    @property
    def tokens(self) -> int:
        return sum(h * w for h, w in self.grids)


class _BatchDecoder(Dataset):
    """Map-style dataset: item ``(epoch, index, rows)`` -> the decoded :class:`Batch`."""

    def __init__(self, root: Path, manifest: Manifest, buckets: list[Bucket], token_px: int,
                 decode: bool = True) -> None:
        self.root, self.manifest = root, manifest
        self.buckets, self.token_px, self.decode = buckets, token_px, decode
        self._open: dict[str, tuple[Any, dict]] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}  # file handles stay in the process that opened them

    def __getitem__(self, item: tuple[int, int, tuple[int, ...]]) -> Batch:
        epoch, index, rows = item
        pixels = [self._pixels(r) for r in rows] if self.decode else []  # (3, h, w) uint8 each
        # One float buffer per batch, images as views of it: a worker then passes the batch
        # through one shared-memory block rather than one per image.
        flat = torch.from_numpy(np.concatenate([p.ravel() for p in pixels] or [np.zeros(0)]))
        flat = flat.float().div_(127.5).sub_(1.0)
        images = [v.view(p.shape) for v, p in zip(flat.split([p.size for p in pixels]), pixels,
                                                  strict=True)]
        grids = [(self.buckets[r].height // self.token_px, self.buckets[r].width // self.token_px)
                 for r in rows]
        m = self.manifest
        return Batch([m.keys[r] for r in rows], [m.captions[r] for r in rows],
                     [m.short_captions[r] for r in rows], images, grids,
                     [self.buckets[r].name for r in rows], epoch, index)

    def _shard(self, shard: str, key: str) -> tuple[Any, dict]:
        if os.getpid() != self._pid:  # a forked worker: its inherited handles are not its own
            self._open, self._pid = {}, os.getpid()
        if shard not in self._open:
            path = self.root / shard
            if not path.is_file():
                raise FileNotFoundError(f"sample {key!r}: its shard {path} is missing; rebuild "
                                        f"or pull the dataset so shards match the manifest")
            self._open[shard] = (open(path, "rb", buffering=0), index_shard(path))
        return self._open[shard]

    def _pixels(self, row: int) -> np.ndarray:
        key, shard, bucket = self.manifest.keys[row], self.manifest.shards[row], self.buckets[row]
        fh, index = self._shard(shard, key)
        members = index.get(key, {})
        ext = image_member(members)
        if ext is None:
            raise ValueError(f"sample {key!r}: shard {shard} has no image member for it "
                             f"(found {sorted(members) or 'nothing'}); rebuild the shards and "
                             f"manifest together")
        offset, size = members[ext]
        try:
            return fitted_pixels(os.pread(fh.fileno(), size, offset), bucket)
        except OSError as exc:
            raise ValueError(f"sample {key!r} in {shard}: image does not decode ({exc}); "
                             f"re-run data validation so the manifest lists only good images"
                             ) from exc

    def close(self) -> None:
        for fh, _ in self._open.values():
            fh.close()
        self._open = {}


class _PlanSampler:
    """Yields ``(epoch, index, rows)`` plan entries from a start position, forever."""

    def __init__(self, loader: PackedLoader, epoch: int, index: int) -> None:
        self.loader, self.epoch, self.index = loader, epoch, index

    def __iter__(self) -> Iterator[tuple[int, int, tuple[int, ...]]]:
        epoch, index = self.epoch, self.index
        while True:
            plan = self.loader.epoch_plan(epoch)
            for i in range(index, len(plan)):
                yield epoch, i, tuple(plan[i])
            epoch, index = epoch + 1, 0


class PackedLoader:
    """Packed mixed-resolution batches from ``dataset_dir`` (tar shards + manifest.parquet)."""

    def __init__(self, dataset_dir: str | Path, buckets: list[Bucket], token_px: int,
                 token_budget: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, shuffle_buffer: int = 1024, decode: bool = True) -> None:
        """``decode=False`` yields batches without images (keys, captions and grids only), for
        training from a feature cache, where decoding would be wasted work."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if shuffle_buffer < 1 or token_px < 1 or num_workers < 0:
            raise ValueError(f"shuffle_buffer ({shuffle_buffer}) and token_px ({token_px}) must "
                             f"be >= 1 and num_workers ({num_workers}) >= 0")
        self.root = Path(dataset_dir)
        self.token_px, self.token_budget, self.seed = token_px, token_budget, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        manifest = read_manifest(self.root)
        keys, names = manifest.keys, manifest.buckets
        by_name = {b.name: b for b in buckets}
        row_buckets = [_bucket_of(k, n, by_name, token_px, token_budget)
                       for k, n in zip(keys, names, strict=True)]
        self.tokens = np.array([b.tokens(token_px) for b in row_buckets], dtype=np.int64)
        self._fingerprint = hashlib.sha256("\n".join(keys + names).encode()).hexdigest()[:16]
        self._decoder = _BatchDecoder(self.root, manifest, row_buckets, token_px, decode)
        self._plans: dict[int, list[list[int]]] = {}
        self._epoch, self._index = 0, 0

    def __len__(self) -> int:
        return len(self.tokens)  # manifest rows

    def global_plan(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of ``epoch`` (manifest row indices), before the rank deal."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.tokens))
        rng = np.random.default_rng([self.seed, epoch, 1])
        plan: list[list[int]] = []
        for window in np.array_split(order, math.ceil(len(order) / self.shuffle_buffer)):
            bins = pack_by_tokens(self.tokens[window].tolist(), self.token_budget)
            plan += [[int(window[i]) for i in bins[b]] for b in rng.permutation(len(bins))]
        return plan

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` as lists of manifest row indices."""
        if epoch not in self._plans:
            plan = self.global_plan(epoch)
            kept = len(plan) - len(plan) % self.world_size
            if kept == 0:
                raise ValueError(f"epoch {epoch} packs into {len(plan)} batches, fewer than "
                                 f"world_size {self.world_size}; add data or lower token_budget")
            self._plans = {epoch: plan[self.rank:kept:self.world_size]}  # keep one epoch
        return self._plans[epoch]

    def batches_in_epoch(self, epoch: int) -> int:
        return len(self.epoch_plan(epoch))

    def __iter__(self) -> Iterator[Batch]:
        sampler = _PlanSampler(self, self._epoch, self._index)
        loader = DataLoader(self._decoder, batch_size=None, sampler=sampler,  # type: ignore[arg-type]
                            num_workers=self.num_workers)
        try:
            for batch in loader:
                self._epoch, self._index = batch.epoch, batch.index + 1  # the next to yield
                yield batch
        finally:
            self._decoder.close()

    def state_dict(self) -> dict[str, Any]:
        """Where iteration stands (the next batch to yield) and what it depends on."""
        return {"epoch": self._epoch, "index": self._index, **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refused if it came from a loader with other settings."""
        for name, mine in self._settings().items():
            if state.get(name) != mine:
                raise ValueError(f"loader state has {name}={state.get(name)!r} but this loader "
                                 f"has {mine!r}; build the loader as the run that saved it did")
        self._epoch, self._index = int(state["epoch"]), int(state["index"])

    def reshard_state(self, states: list[dict[str, Any]], rank: int, world_size: int
                      ) -> dict[str, Any]:
        """The state for rank ``rank`` of ``world_size`` that continues where ``states`` (every
        rank of a run with another world size) stopped: the same epoch, past every batch those
        ranks had taken (up to world_size - 1 of the epoch's batches skipped, none repeated)."""
        places = {(int(s["epoch"]), int(s["index"])) for s in states}
        if len(places) != 1:
            raise ValueError(f"the saved ranks stopped at different places (epoch, index) "
                             f"{sorted(places)}; lockstep training never does, so the "
                             f"checkpoint is damaged")
        (epoch, index), = places
        taken = index * len(states)  # the old ranks took the epoch's batches round robin
        return {**states[0], "epoch": epoch, "index": -(-taken // world_size), "rank": rank,
                "world_size": world_size}

    def _settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "token_budget": self.token_budget, "token_px": self.token_px,
                "shuffle_buffer": self.shuffle_buffer, "manifest": self._fingerprint}


def fitted_pixels(data: bytes, bucket: Bucket) -> np.ndarray:
    """Image bytes -> RGB fitted to ``bucket`` (cover, centre-crop): (3, h, w) uint8."""
    with Image.open(io.BytesIO(data)) as img:
        fitted = fit_to_bucket(img.convert("RGB"), bucket)
    return np.asarray(fitted, dtype=np.uint8).transpose(2, 0, 1)


def to_signed(pixels: np.ndarray) -> Tensor:
    """(3, h, w) uint8 -> float32 in [-1, 1], the range every model here reads."""
    return torch.from_numpy(pixels.astype(np.float32)).div_(127.5).sub_(1.0)


@dataclass
class Manifest:
    """The manifest columns training reads, one entry per row."""

    keys: list[str]
    shards: list[str]
    captions: list[str]
    short_captions: list[str | None]  # a short alternative caption, where the source gave one
    buckets: list[str]  # bucket name "WxH"


def read_manifest(root: Path) -> Manifest:
    """Keys, shards, captions (long and short) and bucket names of a dataset's manifest, checked."""
    path = root / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST} in {root}; build the dataset (shards and "
                                f"manifest) before loading it")
    columns = ["key", "shard", "caption", "bucket"]
    optional = [c for c in ("short_caption",) if c in pq.read_schema(path).names]
    table = pq.read_table(path, columns=columns + optional)
    if table.num_rows == 0:
        raise ValueError(f"{path} has no rows; build the dataset with at least one valid sample")
    out = [table.column(c).to_pylist() for c in columns]
    for c, values in zip(columns, out, strict=True):
        if any(v is None for v in values):
            row = values.index(None)
            raise ValueError(f"{path}: row {row} (key {out[0][row]!r}) has no {c!r}; fix the "
                             f"manifest so every row has key, shard, caption and bucket")
    short = (table.column("short_caption").to_pylist() if optional
             else [None] * table.num_rows)  # manifests built before short captions existed
    return Manifest(out[0], out[1], out[2], short, out[3])


def _bucket_of(key: str, name: str, by_name: dict[str, Bucket], token_px: int,
               budget: int) -> Bucket:
    """The manifest row's bucket, checked against the token grid and the budget."""
    bucket = by_name.get(name)
    if bucket is None:
        raise ValueError(f"sample {key!r} is in bucket {name!r}, which is not among the "
                         f"loader's {len(by_name)} buckets; load with the buckets the manifest "
                         f"was built with")
    if bucket.width % token_px or bucket.height % token_px:
        raise ValueError(f"bucket {name} (sample {key!r}) is not a whole number of "
                         f"{token_px}-px tokens; use a buckets.multiple divisible by token_px")
    if bucket.tokens(token_px) > budget:
        raise ValueError(f"sample {key!r} in bucket {name} has {bucket.tokens(token_px)} "
                         f"tokens, over the token budget of {budget}; raise "
                         f"loader.token_budget")
    return bucket


def loader_throughput(dataset_dir: str | Path, buckets: list[Bucket], token_px: int,
                      token_budget: int, num_workers: int = 2, batches: int = 50,
                      seed: int = 0, shuffle_buffer: int = 1024) -> dict[str, float]:
    """Decode ``batches`` batches; images/s after the first batch (worker start-up apart)."""
    loader = PackedLoader(dataset_dir, buckets, token_px, token_budget, seed,
                          num_workers=num_workers, shuffle_buffer=shuffle_buffer)
    start = time.perf_counter()
    stream = iter(loader)
    first = next(stream)
    first_s = time.perf_counter() - start
    images = tokens = 0
    t0 = time.perf_counter()
    for batch in islice(stream, batches - 1):
        images += len(batch.keys)
        tokens += batch.tokens
    steady_s = time.perf_counter() - t0
    stream.close()
    return {"num_workers": num_workers, "batches": batches,
            "images": images + len(first.keys), "first_batch_s": first_s,
            "images_per_s": images / steady_s if steady_s else float("nan"),
            "tokens_per_s": tokens / steady_s if steady_s else float("nan"),
            "total_s": first_s + steady_s}
