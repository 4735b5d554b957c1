"""The shapes-world data source: rendered scenes with long captions, as ``RawItem``s.

Each index gets its own rng from ``(seed, index)`` alone, so any slice ``[start, stop)`` is
reproducible on its own (workers can make disjoint slices in parallel) and the same
``(seed, index)`` always gives the same PNG bytes, caption and metadata.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator

from PIL import Image

from lens_model.buckets import Bucket
from lens_model.data.captions import long_caption, short_caption
from lens_model.data.items import RawItem
from lens_model.data.world import (
    BACKGROUNDS,
    MAX_OBJECTS,
    MIN_SIDE,
    PATTERNS,
    relations,
    render,
    sample_scene,
)

SOURCE = "shapes"
PNG_COMPRESS_LEVEL = 1  # fast; the shard bytes stay deterministic at any fixed level


def item_rng(seed: int, index: int) -> random.Random:
    """The rng of sample ``index``; string seeds are hashed (SHA-512), so streams are apart."""
    return random.Random(f"shapes/{seed}/{index}")


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of a PIL image at the fast compression level."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def make_items(seed: int, start: int, stop: int, buckets: list[Bucket], min_objects: int,
               max_objects: int, backgrounds: tuple[str, ...] = tuple(BACKGROUNDS),
               patterns: tuple[str, ...] = PATTERNS) -> Iterator[RawItem]:
    """Yield the samples ``start`` to ``stop - 1``: a PNG, its long caption and scene meta.

    The meta also holds a GenEval-worded ``short_caption`` of the scene, for caption mixing.
    """
    if not 0 <= start <= stop:
        raise ValueError(f"shapes slice [{start}, {stop}) is invalid; need 0 <= start <= stop")
    if not buckets:
        raise ValueError("shapes source got no buckets; pass the recipe's buckets "
                         "(lens_model.buckets.buckets_for(recipe.buckets))")
    small = [b.name for b in buckets if min(b.width, b.height) < MIN_SIDE]
    if small:
        raise ValueError(f"buckets {small} have a side under {MIN_SIDE} px, where shapes may "
                         f"touch; use buckets with both sides >= {MIN_SIDE}")
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"object counts {min_objects}..{max_objects} are invalid; need "
                         f"1 <= min_objects <= max_objects <= {MAX_OBJECTS}")
    for index in range(start, stop):
        rng = item_rng(seed, index)
        bucket = rng.choice(buckets)
        scene = sample_scene(rng, min_objects, max_objects, backgrounds, patterns)
        png = encode_png(render(scene, bucket.width, bucket.height))
        caption = long_caption(scene, bucket.width, bucket.height, rng)
        # Its own rng, so adding it left every long caption as it was.
        short = short_caption(scene, random.Random(f"shapes-short/{seed}/{index}"))
        meta = {"scene": scene.to_dict(), "short_caption": short,
                "width": bucket.width, "height": bucket.height,
                "bucket": bucket.name, "relations": relations(scene), "seed": seed,
                "index": index}
        yield RawItem(key=f"shapes-{index:09d}", source=SOURCE, image=png,
                      caption=caption.encode(), meta=meta)
