"""The feature cache: text features and VAE latents precomputed per shard, as safetensors.

Training with frozen encoders need not run them every step: each data shard's text hidden
states, text masks and latents are computed once and stored in one safetensors file per shard,
under ``root/<digest of (encoder_id, vae_id)>/``. A different encoder or VAE thus gets its own
directory and never reads another's features; each file also carries both ids in its metadata,
and a file whose ids differ from the cache's is refused. Files are written atomically.

Layout of a shard file: tensors ``{key}.text`` (T, D), ``{key}.mask`` (T,) and ``{key}.latent``
(C, h, w) per sample, T and (h, w) free per sample, plus ``{key}.short`` (T', D), the short
caption's text features, for samples that have one; metadata ``encoder_id``, ``vae_id``,
``format``, ``keys`` (JSON list, in build order) and ``short`` (the keys with short features).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lens_model.atomic import atomic_path, write_json

FORMAT = "lens-features/2"
# text (T, D), mask (T,), latent (C, h, w), short-caption text (T', D) or None
Features = tuple[Tensor, Tensor, Tensor, Tensor | None]
Sample = tuple[str, Tensor, Tensor, Tensor, Tensor | None]  # key and its Features


class FeatureCache:
    """Per-shard cached text features and VAE latents for one (encoder, VAE) pair."""

    def __init__(self, root: str | Path, encoder_id: str, vae_id: str) -> None:
        if not encoder_id or not vae_id:
            raise ValueError(f"encoder_id ({encoder_id!r}) and vae_id ({vae_id!r}) must be "
                             f"non-empty identity strings, e.g. a model name plus revision")
        self.root, self.encoder_id, self.vae_id = Path(root), encoder_id, vae_id
        ids = json.dumps({"encoder_id": encoder_id, "vae_id": vae_id}, sort_keys=True)
        self.digest = hashlib.sha256(ids.encode()).hexdigest()[:16]
        self.dir = self.root / self.digest

    def path_for(self, shard_name: str) -> Path:
        """Where ``shard_name``'s features live: root/<digest>/<shard_name>.safetensors."""
        if (not shard_name or shard_name.startswith(".") or "/" in shard_name
                or "\\" in shard_name):
            raise ValueError(f"shard name {shard_name!r} must be a plain file name (no path "
                             f"separators, not starting with '.'), e.g. 'shard-00000'")
        return self.dir / f"{shard_name}.safetensors"

    def has(self, shard_name: str) -> bool:
        """Whether the shard is cached; a file with other ids raises (see ``load``)."""
        path = self.path_for(shard_name)
        if not path.is_file():
            return False
        self._check_header(path)
        return True

    def build_shard(self, shard_name: str, samples: Iterable[Sample]) -> Path:
        """Write one shard's ``(key, text (T, D), mask (T,), latent (C, h, w), short)`` samples.

        Nothing is written unless every sample is valid and the iterable finishes; an existing
        file is replaced only by a complete new one.
        """
        path = self.path_for(shard_name)
        tensors: dict[str, Tensor] = {}
        keys: list[str] = []
        with_short: list[str] = []
        dims: dict[str, tuple[str, int]] = {}  # "text"/"latent" -> (first key, its D or C)
        for item in samples:
            if not isinstance(item, tuple | list) or len(item) != 5:
                raise ValueError(f"shard {shard_name!r}: each sample must be (key, text, mask, "
                                 f"latent, short or None), got {type(item).__name__} of length "
                                 f"{len(item) if isinstance(item, tuple | list) else '?'}")
            key, text, mask, latent, short = item
            where = f"shard {shard_name!r}, sample {key!r}"
            if not isinstance(key, str) or not key:
                raise ValueError(f"shard {shard_name!r}: sample key {key!r} must be a "
                                 f"non-empty string")
            if f"{key}.text" in tensors:
                raise ValueError(f"{where}: duplicate key; each key may appear once per shard")
            _check_shapes(where, text, mask, latent, dims, key)
            if short is not None:
                if not isinstance(short, torch.Tensor) or short.ndim != 2 or \
                        short.shape[1] != text.shape[1]:
                    raise ValueError(f"{where}: short caption features must be a (T', "
                                     f"{text.shape[1]}) tensor like its text, or None")
                tensors[f"{key}.short"] = short.detach().to("cpu").contiguous().clone()
                with_short.append(key)
            # clone: slices of one batch tensor share storage, which safetensors refuses
            tensors[f"{key}.text"] = text.detach().to("cpu").contiguous().clone()
            tensors[f"{key}.mask"] = mask.detach().to("cpu").contiguous().clone()
            tensors[f"{key}.latent"] = latent.detach().to("cpu").contiguous().clone()
            keys.append(key)
        metadata = {"format": FORMAT, "encoder_id": self.encoder_id, "vae_id": self.vae_id,
                    "keys": json.dumps(keys), "short": json.dumps(with_short)}
        ids_file = self.dir / "ids.json"
        if not ids_file.exists():  # for people browsing the cache: which dir holds what
            write_json(ids_file, {"encoder_id": self.encoder_id, "vae_id": self.vae_id})
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    def keys(self, shard_name: str) -> list[str]:
        """The shard's sample keys, in build order (from the header only)."""
        return self._check_header(self._existing(shard_name))

    def load(self, shard_name: str, keys: Iterable[str] | None = None) -> dict[str, Features]:
        """``{key: (text, mask, latent, short)}`` for all or only the given ``keys``."""
        path = self._existing(shard_name)
        stored = self._check_header(path)
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
        wanted = stored if keys is None else list(keys)
        missing = sorted(set(wanted) - set(stored))
        if missing:
            raise KeyError(f"shard {shard_name!r} has no cached features for {missing[:5]} "
                           f"({len(missing)} keys); rebuild it with build_shard")
        out: dict[str, Features] = {}
        with safe_open(str(path), framework="pt") as f:
            for key in wanted:
                short = f.get_tensor(f"{key}.short") if f"{key}.short" in names else None
                out[key] = (f.get_tensor(f"{key}.text"), f.get_tensor(f"{key}.mask"),
                            f.get_tensor(f"{key}.latent"), short)
        return out

    def _existing(self, shard_name: str) -> Path:
        path = self.path_for(shard_name)
        if not path.is_file():
            raise FileNotFoundError(f"no cached features for shard {shard_name!r} at {path} "
                                    f"(encoder {self.encoder_id!r}, VAE {self.vae_id!r}); "
                                    f"build it with FeatureCache.build_shard")
        return path

    def _check_header(self, path: Path) -> list[str]:
        """The file's keys, after checking its format and ids against this cache's."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, names = f.metadata() or {}, set(f.keys())
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"feature file {path} is unreadable ({exc}); delete it and "
                             f"rebuild the shard") from exc
        if meta.get("format") != FORMAT:
            raise ValueError(f"feature file {path} has format {meta.get('format')!r}, expected "
                             f"{FORMAT!r}; delete it and rebuild the shard")
        for field, mine in (("encoder_id", self.encoder_id), ("vae_id", self.vae_id)):
            if meta.get(field) != mine:
                raise ValueError(f"feature file {path} was built with {field} "
                                 f"{meta.get(field)!r}, but this cache is for {mine!r}; it is "
                                 f"not this cache's file: delete it and rebuild the shard")
        keys = json.loads(meta.get("keys", "[]"))
        expected = {f"{k}.{part}" for k in keys for part in ("text", "mask", "latent")}
        expected |= {f"{k}.short" for k in json.loads(meta.get("short", "[]"))}
        if names != expected:
            raise ValueError(f"feature file {path} holds tensors that do not match its key list "
                             f"({len(names)} vs {len(expected)} expected); delete it and "
                             f"rebuild the shard")
        return keys


def _check_shapes(where: str, text: Tensor, mask: Tensor, latent: Tensor,
                  dims: dict[str, tuple[str, int]], key: str) -> None:
    """One sample's shapes, and its D and C against the shard's first sample."""
    for name, value in (("text", text), ("mask", mask), ("latent", latent)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: {name} must be a torch.Tensor, got "
                             f"{type(value).__name__}")
    if text.ndim != 2 or mask.ndim != 1 or latent.ndim != 3:
        raise ValueError(f"{where}: expected text (T, D), mask (T,), latent (C, h, w); got "
                         f"{tuple(text.shape)}, {tuple(mask.shape)}, {tuple(latent.shape)}")
    if mask.shape[0] != text.shape[0]:
        raise ValueError(f"{where}: mask has {mask.shape[0]} entries for {text.shape[0]} text "
                         f"tokens; pass one mask value per token")
    for name, size in (("text", text.shape[1]), ("latent", latent.shape[0])):
        first, ref = dims.setdefault(name, (key, size))
        if size != ref:
            label = "feature dim D" if name == "text" else "latent channels C"
            raise ValueError(f"{where}: {label} is {size}, but sample {first!r} has {ref}; "
                             f"one shard comes from one encoder and one VAE")
