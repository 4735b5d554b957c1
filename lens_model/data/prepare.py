"""Turn RawItems into one tar shard plus candidate and quarantine rows.

Items that carry reading problems go straight to quarantine. Every other item becomes exactly
one candidate row (CANDIDATE_SCHEMA) and one sample in the shard, even when its bytes do not
decode: the contract, not this module, decides what is rejected, so each decision stays
visible in one place. Decoding is defensive: the declared size is checked against
``max_pixels`` before any pixel is loaded, and no PIL error or warning escapes.

Decoded images are normalised to RGB: alpha (RGBA, LA, PA, or a palette/grey transparency) is
composited on white, 16-bit grey is scaled (not clipped) to 8 bits, CMYK and the rest go
through PIL's conversion. Such images are re-encoded as PNG; RGB JPEG/PNG/WebP keep their
original bytes. Features are computed on the decoded RGB image. PIL's own bomb limit (twice
``Image.MAX_IMAGE_PIXELS``) still refuses larger images when ``max_pixels`` is set above it.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from lens_model.buckets import Bucket, assign_bucket
from lens_model.data import quality, shards
from lens_model.data.items import RawItem
from lens_model.data.tokens import count_tokens

PIL_MAX_PIXELS = 89_478_485  # PIL's default MAX_IMAGE_PIXELS
KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # RGB in these keeps its bytes
# Only these decoders run on user bytes: others (EPS runs Ghostscript, ...) widen the attack.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Leading bytes of image formats: a file that has one but does not open is broken, not text.
SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\0", b"MM\0*")
WHITE = (255, 255, 255)


@dataclass
class Decoded:
    """The outcome of decoding one image's bytes."""

    rgb: Image.Image | None = None
    mode: str | None = None  # the mode as decoded, before normalisation
    ext: str = "bin"  # the shard member's extension
    data: bytes = b""  # the shard member's bytes
    error: str | None = None


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB: alpha composited on white, 16-bit scaled down."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (PNG opens as I;16 or I): 65535 -> 255. 32-bit "I" above 65535 clips.
        grey = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0  # (H, W)
        img = Image.fromarray(np.rint(grey).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", img.size, WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img if img.mode == "RGB" else img.convert("RGB")


def decode(data: bytes | None, max_pixels: int = PIL_MAX_PIXELS) -> Decoded:
    """Decode ``data`` safely; on failure ``error`` says why and the bytes are kept as .bin."""
    if data is None:
        return Decoded(error="missing_image")
    if not data:
        return Decoded(error="empty_file")
    bad = Decoded(data=data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError:
        bad.error = "decompression_bomb"
        return bad
    except UnidentifiedImageError:
        bad.error = "undecodable_image" if _looks_like_image(data) else "not_an_image"
        return bad
    except Exception:  # hostile bytes raise many types (SyntaxError, struct.error, ...)
        bad.error = "undecodable_image"
        return bad
    w, h = img.size
    if w * h > max_pixels:
        bad.error = "decompression_bomb"
        return bad
    if w < 1 or h < 1:
        bad.error = "undecodable_image"
        return bad
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. PIL's warnings on odd EXIF or palettes
            img.load()
            rgb = to_rgb(img)
    except Exception as exc:
        bad.error = "truncated_image" if "truncat" in str(exc) else "undecodable_image"
        return bad
    if rgb is img and img.format in KEEP_FORMATS:  # plain RGB, nothing to composite
        return Decoded(rgb, img.mode, KEEP_FORMATS[img.format], data)
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    return Decoded(rgb, img.mode, "png", buf.getvalue())


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _caption_text(raw: bytes | None) -> str | None:
    """The caption as stripped UTF-8 text; None when absent, not UTF-8, or blank."""
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a BOM is not caption text
    except UnicodeDecodeError:
        return None
    return text.strip() or None


def _short_caption(meta: dict[str, Any] | None) -> str | None:
    """The source's short alternative caption (``meta["short_caption"]``), if it gave one."""
    text = (meta or {}).get("short_caption")
    return text.strip() or None if isinstance(text, str) else None


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _quarantine_row(item: RawItem, reasons: list[str], detail: str) -> dict[str, Any]:
    return {"key": item.key, "source": item.source, "reasons": reasons, "detail": detail,
            "stage": "ingest", "image_bytes": item.image, "caption_bytes": item.caption}


def prepare_shard(items: Iterable[RawItem], shard_path: Path, buckets: list[Bucket], tokenizer: Any,
                  max_pixels: int = PIL_MAX_PIXELS) -> tuple[list[dict], list[dict]]:
    """Write the shard; return ``(candidate_rows, quarantine_rows)`` (see the module doc)."""
    shard_path = Path(shard_path)
    candidates: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    samples: list[shards.Sample] = []
    seen: set[str] = set()
    total = 0
    for item in items:
        total += 1
        if item.problems:
            codes = list(dict.fromkeys(code for code, _ in item.problems))  # unique, in order
            quarantine.append(_quarantine_row(item, codes,
                                              "; ".join(detail for _, detail in item.problems)))
            continue
        if item.key in seen:  # a second sample under one key would shadow the first in the tar
            quarantine.append(_quarantine_row(item, ["duplicate_key"],
                                              f"key {item.key} already used in this shard"))
            continue
        seen.add(item.key)
        dec = decode(item.image, max_pixels)
        caption = _caption_text(item.caption)
        row: dict[str, Any] = {
            "key": item.key, "shard": shard_path.name, "caption": caption,
            "word_count": len(caption.split()) if caption else None, "token_count": None,
            # unknown, not 0: an undecodable image breaks only the decodable rule
            "width": None, "height": None, "area": None, "aspect": None, "bucket": None,
            "sha256": hashlib.sha256(item.image).hexdigest() if item.image is not None else None,
            "source": item.source,
            "decodable": dec.rgb is not None, "blur": None, "entropy": None, "luminance": None,
            "meta": _json(item.meta) if item.meta is not None else None,
            "short_caption": _short_caption(item.meta),
            "decode_error": dec.error,
        }
        if dec.rgb is not None:
            w, h = dec.rgb.size
            row.update(width=w, height=h, area=w * h, aspect=w / h,
                       bucket=assign_bucket(w, h, buckets).name, **quality.features(dec.rgb))
        info = {"source": item.source, "mode": dec.mode, "meta": item.meta}
        parts = {dec.ext: dec.data, "json": _json(info).encode()}
        if item.image is not None and dec.data != item.image:  # re-encoded: keep the original
            parts[shards.ORIGINAL_EXT] = item.image
        if item.caption is not None and _is_utf8(item.caption):
            parts["txt"] = item.caption  # kept exactly as given
        samples.append((item.key, parts))
        candidates.append(row)
    with_text = [row for row in candidates if row["caption"] is not None]
    for row, n in zip(with_text, count_tokens(tokenizer, [r["caption"] for r in with_text]),
                      strict=True):
        row["token_count"] = n
    shards.write_shard(shard_path, sorted(samples, key=lambda s: s[0]))
    assert len(candidates) + len(quarantine) == total, "prepare_shard lost or doubled an item"
    return candidates, quarantine
