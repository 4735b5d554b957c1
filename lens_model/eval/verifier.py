"""A programmatic GenEval-style verifier for shapes-world images.

``detect`` reads an RGB image back into objects: every pixel goes to its nearest palette entry
(object colours and both tones of every background) in CIE Lab, or to none when it is far from
all (blurred edges, noise); per-colour connected components that are big and solid enough
become objects. An object's shape is the template (drawn with ``world.draw_shape``) that best
overlaps its coverage, where edge pixels count by how much of the object colour they hold.
``to_scene`` turns detections into a ``Scene`` so the decision is ``captions.satisfies``, the
same code that defines the ground truth. ``verify`` gives pass/fail with a reason; ``score``
aggregates GenEval-style.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from lens_model.data.captions import CATEGORIES, satisfies
from lens_model.data.world import (
    BACKGROUNDS,
    COLORS,
    MIN_SIDE,
    PLURALS,
    RELATIONS,
    SHAPES,
    SIZE_ORDER,
    SIZES,
    Obj,
    Scene,
    draw_shape,
)
from lens_model.reasoner.grammar import KINDS

# Lab distance past which a pixel matches no palette entry: blur mixes edges into in-between
# colours, left unclassified here and weighed by ``coverage``. Object colours are >= 28 apart
# (blue/purple), object and background colours >= 50, so sensor-like noise stays within it.
MAX_DIST = 25.0
# A component smaller than this share of the smallest object's box is noise. The sparsest
# shape (star) covers ~0.37 of its box, so real objects clear it with room for blur.
MIN_AREA_SHARE = 0.15
TEMPLATE_SIDE = 64  # templates are drawn large and box-filtered down to each component's bbox
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity: star tips meet their body diagonally

ImageLike = Image.Image | np.ndarray


@dataclass(frozen=True)
class Detection:
    """One object read from an image.

    ``bbox`` is (x0, y0, x1, y1) in pixels, end-exclusive; ``center`` is the bbox centre as
    fractions of width and height (as ``Obj.x``/``Obj.y``); ``match`` is the soft IoU of the
    mask with the chosen shape's template (1.0 is a perfect fit).
    """

    shape: str
    color: str
    bbox: tuple[int, int, int, int]
    center: tuple[float, float]
    area: int
    match: float


@dataclass(frozen=True)
class DetectedObj(Obj):
    """An ``Obj`` whose box uses the measured side, not its size class's nominal side.

    ``size`` is the nearest class (what a caption would say), but ``relation()`` reads
    ``box()``; an object drawn bigger than "large" would otherwise get a box too small and a
    relation could hold between objects whose pixels overlap.
    """

    measured_side: float = 0.0

    @property
    def side(self) -> float:
        return self.measured_side


# ---------------------------------------------------------------- input checks


def as_rgb_array(image: ImageLike) -> np.ndarray:
    """``image`` as an HxWx3 uint8 array; anything else raises a ValueError saying the fix."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"image mode {image.mode!r} is not supported; "
                             "pass image.convert('RGB')")
        arr = np.asarray(image)
    elif isinstance(image, np.ndarray):
        arr = image
    else:
        raise ValueError(f"image of type {type(image).__name__} is not supported; pass a PIL "
                         "RGB image or an HxWx3 uint8 numpy array")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image array shape {arr.shape} is not HxWx3; pass RGB pixels "
                         "(drop alpha, stack grey into 3 channels)")
    if arr.dtype != np.uint8:
        raise ValueError(f"image array dtype {arr.dtype} is not uint8; scale to 0..255 and "
                         "cast with .astype(np.uint8)")
    if min(arr.shape[:2]) < MIN_SIDE:
        raise ValueError(f"image {arr.shape[1]}x{arr.shape[0]} is too small: the short side "
                         f"must be >= {MIN_SIDE} px (world.MIN_SIDE) for objects to be apart")
    return arr


def check_spec(spec: Any) -> None:
    """Raise a ValueError naming the bad part of a prompt spec (as ``Prompt.spec``)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("objects"), list) \
            or not spec["objects"]:
        raise ValueError("spec: needs a non-empty 'objects' list of {shape, color, count} "
                         "items (as captions.Prompt.spec)")
    for i, item in enumerate(spec["objects"]):
        where = f"spec objects[{i}]"
        if not isinstance(item, dict) or item.get("shape") not in SHAPES:
            raise ValueError(f"{where}: shape must be one of: {', '.join(SHAPES)}")
        if item.get("color") not in (None, *COLORS):
            raise ValueError(f"{where}: color {item.get('color')!r} is unknown; use None or "
                             f"one of: {', '.join(COLORS)}")
        count = item.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"{where}: count {count!r} must be an int >= 0")
    rel = spec.get("relation")
    if rel is None:
        return
    n = len(spec["objects"])
    if not isinstance(rel, dict) or rel.get("type") not in RELATIONS \
            or rel.get("a") not in range(n) or rel.get("b") not in range(n):
        raise ValueError(f"spec relation {rel!r} is invalid; use None or {{'a': i, 'type': "
                         f"one of {', '.join(RELATIONS)}, 'b': j}} with item indices < {n}")


# ---------------------------------------------------------------- colour


def to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (uint8, ...x3) to CIE Lab (D65): distances there roughly follow perceived ones."""
    c = rgb.astype(np.float32) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                  [0.0193, 0.1192, 0.9505]], dtype=np.float32)
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883], dtype=np.float32)
    eps = (6 / 29) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


_OBJECT_NAMES = tuple(COLORS)
_BG_NAMES = tuple(name for name in BACKGROUNDS for _ in range(2))  # one per tone
_PALETTE_LAB = to_lab(np.array([*COLORS.values(), *(t for pair in BACKGROUNDS.values()
                                                     for t in pair)], dtype=np.uint8))


def classify_pixels(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel palette index (objects first, then background tones); -1 where none is near."""
    lab = to_lab(rgb)
    # One entry at a time: an HxWxPx3 difference array would be ~60x the image in memory.
    dist = np.stack([np.linalg.norm(lab - entry, axis=-1) for entry in _PALETTE_LAB], axis=-1)
    index = dist.argmin(axis=-1)
    index[dist.min(axis=-1) > MAX_DIST] = -1
    return index


# ---------------------------------------------------------------- shape


@lru_cache(maxsize=4096)
def template(shape: str, width: int, height: int) -> np.ndarray:
    """Coverage (0..1) of ``shape`` drawn large, cropped to its ink and box-filtered to size."""
    canvas = Image.new("L", (TEMPLATE_SIDE, TEMPLATE_SIDE), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, (0, 0, TEMPLATE_SIDE, TEMPLATE_SIDE), 255)
    canvas = canvas.crop(canvas.getbbox())  # the star is shorter than its box
    small = canvas.resize((width, height), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def soft_iou(mask: np.ndarray, cover: np.ndarray) -> float:
    m = mask.astype(np.float32)
    return float(np.minimum(m, cover).sum() / np.maximum(m, cover).sum())


@lru_cache(maxsize=8192)
def window_template(shape: str, width: int, height: int, pad: int) -> np.ndarray:
    """``shape``'s coverage on a ``width`` x ``height`` bbox padded by one pixel, the shape
    filling the bbox grown by ``pad`` (0 or 1) pixels a side."""
    out = np.zeros((height + 2, width + 2), dtype=np.float32)
    out[1 - pad:height + 1 + pad, 1 - pad:width + 1 + pad] = \
        template(shape, width + 2 * pad, height + 2 * pad)
    return out


def classify_shape(soft: np.ndarray) -> tuple[str, float]:
    """The shape whose template best overlaps ``soft``, and that soft IoU.

    ``soft`` is an object's coverage on its bbox padded by one pixel (see ``coverage``).
    Templates are tried filling the bbox and the padded box: blur can wipe out one-pixel tips
    (a diamond's corners, a star's points), so the shape's box may be a pixel wider a side.
    """
    h, w = soft.shape[0] - 2, soft.shape[1] - 2
    scores = {s: max(soft_iou(soft, window_template(s, w, h, pad)) for pad in (0, 1))
              for s in SHAPES}
    best = max(scores, key=scores.__getitem__)
    return best, scores[best]


# ---------------------------------------------------------------- detection


def components(mask: np.ndarray, min_area: float) -> list[tuple[slice, slice, np.ndarray]]:
    """8-connected components of ``mask`` big and thick enough to be objects, hole-filled.

    A component must survive one 4-neighbour erosion: the one-pixel rings that blur leaves
    around an object in an in-between colour do not, while an 8 px star keeps its core.
    """
    labels, _ = ndimage.label(mask, structure=_EIGHT)
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        comp = labels[sl] == i
        if comp.sum() < min_area or not ndimage.binary_erosion(comp).any():
            continue
        out.append((sl[0], sl[1], ndimage.binary_fill_holes(comp)))  # noise specks inside
    return out


def background_tone(index: np.ndarray) -> tuple[str, np.ndarray]:
    """The background whose tones cover most pixels (light grey if none), and its mean RGB."""
    tones = index[index >= len(_OBJECT_NAMES)] - len(_OBJECT_NAMES)
    name = _BG_NAMES[int(np.bincount(tones).argmax())] if tones.size else next(iter(BACKGROUNDS))
    return name, np.mean(BACKGROUNDS[name], axis=0, dtype=np.float32)


def coverage(rgb: np.ndarray, index: np.ndarray, ys: slice, xs: slice, comp: np.ndarray,
             color: str, bg: np.ndarray) -> np.ndarray:
    """An object's coverage on its bbox padded by one pixel (``rgb``/``index`` are padded).

    1 on the component; on unclassified pixels touching it (edges blur mixed with the
    background) the object colour's share, unmixed along the background-to-colour line.
    Without it a blurred 10 px square, corners gone, fits a circle better than a square.
    """
    region = np.zeros((comp.shape[0] + 2, comp.shape[1] + 2), dtype=bool)
    region[1:-1, 1:-1] = comp
    window = (slice(ys.start, ys.stop + 2), slice(xs.start, xs.stop + 2))
    near = ndimage.binary_dilation(region, _EIGHT) & ~region & (index[window] == -1)
    obj = np.asarray(COLORS[color], dtype=np.float32)
    pixel = rgb[window].astype(np.float32)
    share = np.clip((pixel - bg) @ (obj - bg) / ((obj - bg) @ (obj - bg)), 0.0, 1.0)
    return np.where(region | near, share, 0.0).astype(np.float32)


def _detect(rgb: np.ndarray, index: np.ndarray, bg: np.ndarray) -> list[Detection]:
    height, width = index.shape
    min_area = MIN_AREA_SHARE * (SIZES["small"] * min(width, height)) ** 2
    # Pad by one pixel so every object has a full ring for ``coverage``; -2 is "off frame".
    rgb_pad = np.pad(rgb, ((1, 1), (1, 1), (0, 0)), mode="edge")
    index_pad = np.pad(index, 1, constant_values=-2)
    found = []
    for k, color in enumerate(_OBJECT_NAMES):
        for ys, xs, comp in components(index == k, min_area):
            shape, match = classify_shape(coverage(rgb_pad, index_pad, ys, xs, comp, color, bg))
            bbox = (xs.start, ys.start, xs.stop, ys.stop)
            center = ((xs.start + xs.stop) / 2 / width, (ys.start + ys.stop) / 2 / height)
            found.append(Detection(shape, color, bbox, center, int(comp.sum()), match))
    return sorted(found, key=lambda d: (d.bbox[1], d.bbox[0]))


def detect(image: ImageLike) -> list[Detection]:
    """Objects in ``image``: one per solid same-colour region, with colour, shape and place."""
    rgb = as_rgb_array(image)
    index = classify_pixels(rgb)
    return _detect(rgb, index, background_tone(index)[1])


def to_scene(detections: list[Detection], width: int, height: int,
             background: str = "light grey") -> Scene:
    """A ``Scene`` of ``DetectedObj``s for ``captions.satisfies``.

    Built directly, not via ``Scene.from_dict``: generated objects may overlap or touch the
    frame, which is a wrong answer to judge, not an input error. The pattern is not measured.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} is invalid; both sides must be >= 1")
    short = min(width, height)
    objs = []
    for d in detections:
        x0, y0, x1, y1 = d.bbox
        side = max(x1 - x0, y1 - y0) / short  # layout units: sides are short-side fractions
        size = min(SIZE_ORDER, key=lambda s: abs(SIZES[s] - side))
        objs.append(DetectedObj(d.shape, d.color, size, d.center[0], d.center[1], side))
    return Scene(tuple(objs), background, "plain")


# ---------------------------------------------------------------- decision and scoring


def _count_phrase(n: int, shape: str, color: str | None) -> str:
    noun = shape if n == 1 else PLURALS[shape]
    return f"{n} {color} {noun}" if color else f"{n} {noun}"


def describe_found(detections: list[Detection], places: bool = False) -> str:
    """Counts per colour and shape, or (``places``) each object with its centre."""
    if not detections:
        return "nothing"
    if places:
        return ", ".join(f"{d.color} {d.shape} at ({d.center[0]:.2f}, {d.center[1]:.2f})"
                         for d in detections)
    counts = Counter((d.color, d.shape) for d in detections)
    return ", ".join(_count_phrase(n, s, c) for (c, s), n in sorted(counts.items()))


def describe_spec(spec: dict[str, Any]) -> str:
    items = spec["objects"]
    text = ", ".join(_count_phrase(i["count"], i["shape"], i["color"]) for i in items)
    rel = spec.get("relation")
    if rel is not None:
        text += f"; {items[rel['a']]['shape']} {rel['type']} {items[rel['b']]['shape']}"
    return text


def read_scene(image: ImageLike) -> tuple[list[Detection], Scene]:
    """Objects in ``image`` and the ``Scene`` they make (with the measured background)."""
    rgb = as_rgb_array(image)
    index = classify_pixels(rgb)
    background, tone = background_tone(index)
    detections = _detect(rgb, index, tone)
    return detections, to_scene(detections, rgb.shape[1], rgb.shape[0], background)


def verify(image: ImageLike, spec: dict[str, Any]) -> tuple[bool, str]:
    """Whether ``image`` satisfies ``spec`` (a ``Prompt.spec``), and what was found vs asked."""
    check_spec(spec)
    detections, scene = read_scene(image)
    ok = satisfies(spec, scene)
    places = spec.get("relation") is not None
    reason = f"found {describe_found(detections, places)}; asked {describe_spec(spec)}"
    return ok, ("pass: " if ok else "fail: ") + reason


def score(results: list[tuple[str, bool]]) -> dict[str, float]:
    """Per-category accuracy (categories present) and ``overall``, their unweighted mean.
    Categories are shapes-GenEval's and shapes-GenEval-R's wordings (grammar.KINDS)."""
    known = CATEGORIES + KINDS
    if not results:
        raise ValueError("score: no results; pass a list of (category, passed) pairs")
    per: dict[str, list[bool]] = {}
    for i, result in enumerate(results):
        if not isinstance(result, tuple | list) or len(result) != 2:
            raise ValueError(f"score: results[{i}] = {result!r} is not a (category, passed) "
                             "pair")
        category, passed = result
        if category not in known:
            raise ValueError(f"score: results[{i}] category {category!r} is unknown; use one "
                             f"of: {', '.join(known)}")
        per.setdefault(category, []).append(bool(passed))
    out = {c: sum(v) / len(v) for c in known if (v := per.get(c))}
    out["overall"] = sum(out.values()) / len(out)
    return out
