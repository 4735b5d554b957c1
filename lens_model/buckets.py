"""Resolution buckets and the policy that assigns every image to one.

Buckets come from base areas (given as sides: 1024 means 1024^2), aspect ratios and a size
multiple. For a ratio r = w/h the short side is sqrt(area / max(r, 1/r)) rounded to the
multiple, and the long side is the short side times the ratio, rounded to the multiple. At
1024^2 this gives the paper's 736x1472 ... 1472x736; three bases and nine ratios give its 27.
At tiny sizes two ratios can snap to the same size; such duplicates are merged.

Assignment policy (``assign_bucket``):
1. aspect: the bucket whose log aspect ratio is nearest the image's;
2. area: among those, the largest base area not above the image's area (never upscale more
   than the snapping needs); an image smaller than every base gets the smallest;
3. resize/crop (``fit_to_bucket``): scale so the image covers the bucket, then centre-crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int
    base: int  # the base side this bucket was made from

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def tokens(self, token_px: int) -> int:
        """Image tokens for this bucket at ``token_px`` pixels per token side."""
        return (self.width // token_px) * (self.height // token_px)


def parse_ratio(ratio: str) -> float:
    w, h = ratio.split(":")
    return int(w) / int(h)


def _snap(x: float, multiple: int) -> int:
    return max(multiple, math.floor(x / multiple + 0.5) * multiple)  # half up, not to even


def make_buckets(base_sizes: list[int], aspect_ratios: list[str], multiple: int) -> list[Bucket]:
    """All (base, ratio) buckets, de-duplicated, sorted by base then aspect."""
    out: dict[tuple[int, int], Bucket] = {}
    for base in base_sizes:
        for ratio in aspect_ratios:
            r = parse_ratio(ratio)
            stretch = max(r, 1 / r)
            short = _snap(math.sqrt(base * base / stretch), multiple)
            long = _snap(short * stretch, multiple)
            w, h = (long, short) if r >= 1 else (short, long)
            out.setdefault((w, h), Bucket(w, h, base))
    return sorted(out.values(), key=lambda b: (b.base, b.aspect))


def assign_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket an image of ``width`` x ``height`` is trained at (policy in the module doc)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} has no bucket: both sides must be > 0")
    log_aspect = math.log(width / height)
    best_gap = min(abs(math.log(b.aspect) - log_aspect) for b in buckets)
    same_aspect = [b for b in buckets if abs(math.log(b.aspect) - log_aspect) - best_gap < 1e-9]
    area = width * height
    fitting = [b for b in same_aspect if b.base * b.base <= area]
    pool = fitting or [min(same_aspect, key=lambda b: b.base)]
    return max(pool, key=lambda b: b.base)


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Scale ``image`` to cover ``bucket`` (bicubic), then centre-crop to it exactly."""
    w, h = image.size
    scale = max(bucket.width / w, bucket.height / h)
    new_w, new_h = max(bucket.width, round(w * scale)), max(bucket.height, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - bucket.width) // 2, (new_h - bucket.height) // 2
    return image.crop((left, top, left + bucket.width, top + bucket.height))


def buckets_for(recipe_buckets: object) -> list[Bucket]:
    """Buckets of a recipe's ``buckets`` section."""
    return make_buckets(
        list(recipe_buckets.base_sizes),  # type: ignore[attr-defined]
        list(recipe_buckets.aspect_ratios),  # type: ignore[attr-defined]
        int(recipe_buckets.multiple),  # type: ignore[attr-defined]
    )
