"""The procedural shapes world: palette, shapes, scenes, relations and a flat-colour renderer.

Layout lives in a resolution-free frame. An object's centre ``(x, y)`` is a fraction of the
image width and height, and its side is a fraction of the image's *short* side (so shapes stay
square at every aspect). Objects are placed so their boxes are separated along x or y by
``GAP`` in these units, and sit ``MARGIN`` inside the frame. Because width and height are both
at least the short side, that separation and containment then hold in pixels at every aspect
ratio: any render with a short side of at least ``MIN_SIDE`` has a background pixel between
every two objects (a verifier can count connected components), and relations (left of, above,
...) mean the same at every size.

Every pixel of a render is exactly one palette colour (no anti-aliasing), so mapping each pixel
to its nearest palette colour recovers the scene exactly. Object colours are saturated or
black; background tones are light and desaturated, far from every object colour. White is left
out (too close to the light backgrounds), and so is the hexagon (a circle at 8-16 px).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

COLORS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (245, 220, 40),
    "green": (40, 160, 70),
    "blue": (40, 90, 225),
    "purple": (135, 60, 190),
    "pink": (240, 110, 190),
    "brown": (125, 75, 35),
    "black": (25, 25, 25),
}

# name -> (base tone, pattern tone). The pattern tone is the base darkened, still far from
# every object colour; both are background for a verifier.
BACKGROUNDS: dict[str, tuple[RGB, RGB]] = {
    "light grey": ((214, 214, 214), (186, 186, 186)),
    "cream": ((240, 230, 202), (222, 206, 166)),
    "mint": ((206, 236, 218), (176, 216, 192)),
    "lavender": ((226, 218, 242), (202, 190, 228)),
    "pale sky": ((204, 224, 242), (176, 202, 228)),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
PLURALS: dict[str, str] = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}
PATTERNS: tuple[str, ...] = ("plain", "horizontal stripes", "vertical stripes", "checks")
FILL: dict[str, float] = {"circle": 0.785, "square": 1.0, "triangle": 0.5, "diamond": 0.5,
                          "cross": 0.59, "star": 0.366}  # share of the box each shape covers

# Object side as a fraction of the image's short side. Small is 8 px at the 24 px short side
# of the smallest tiny buckets; steps of ~1.25x keep the three classes apart.
SIZES: dict[str, float] = {"small": 0.34, "medium": 0.42, "large": 0.52}
SIZE_ORDER: tuple[str, ...] = ("small", "medium", "large")
GAP = 0.08  # >= 1.92 px at a 24 px short side, so rounding leaves >= 1 background pixel
MARGIN = 0.03
MIN_SIDE = 24  # the smallest short side at which the no-touching guarantee holds
MAX_OBJECTS = 4
PATTERN_CELLS = 6  # stripes / checks per short side
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Obj:
    """One flat-coloured shape; ``x``/``y`` are its centre as fractions of width/height."""

    shape: str
    color: str
    size: str
    x: float
    y: float

    @property
    def side(self) -> float:
        return SIZES[self.size]

    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in layout units (side measured in short-side fractions)."""
        h = self.side / 2
        return self.x - h, self.y - h, self.x + h, self.y + h

    def pixel_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in pixels, end-exclusive: the square the shape is drawn in."""
        side = max(1, round(self.side * min(width, height)))
        x0 = round(self.x * width - side / 2)
        y0 = round(self.y * height - side / 2)
        return x0, y0, x0 + side, y0 + side

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "size": self.size,
                "x": self.x, "y": self.y}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "object") -> Obj:
        """Build from ``to_dict`` output; unknown names raise a ValueError naming ``where``."""
        missing = {"shape", "color", "size", "x", "y"} - set(d)
        if missing:
            raise ValueError(f"{where}: missing keys {sorted(missing)}; "
                             "an object needs shape, color, size, x, y")
        _check_name(d["shape"], SHAPES, f"{where}: shape")
        _check_name(d["color"], tuple(COLORS), f"{where}: color")
        _check_name(d["size"], SIZE_ORDER, f"{where}: size")
        x, y = float(d["x"]), float(d["y"])
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise ValueError(f"{where}: centre ({x}, {y}) must lie in [0, 1] x [0, 1]")
        return cls(d["shape"], d["color"], d["size"], x, y)


@dataclass(frozen=True)
class Scene:
    """Objects on a named background with a pattern."""

    objects: tuple[Obj, ...]
    background: str
    pattern: str

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [o.to_dict() for o in self.objects],
                "background": self.background, "pattern": self.pattern}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        """Build from ``to_dict`` output, checking names and that objects are apart."""
        for key in ("objects", "background", "pattern"):
            if key not in d:
                raise ValueError(f"scene: missing key {key!r}; a scene needs objects, "
                                 "background, pattern")
        _check_name(d["background"], tuple(BACKGROUNDS), "scene: background")
        _check_name(d["pattern"], PATTERNS, "scene: pattern")
        objs = tuple(Obj.from_dict(o, f"scene object {i}") for i, o in enumerate(d["objects"]))
        if not 1 <= len(objs) <= MAX_OBJECTS:
            raise ValueError(f"scene: {len(objs)} objects; a scene holds 1 to {MAX_OBJECTS}")
        for i, j in _pairs(len(objs)):
            if not apart(objs[i], objs[j]):
                raise ValueError(f"scene: objects {i} and {j} are closer than the gap {GAP}; "
                                 "move them apart")
        for i, o in enumerate(objs):
            if not inside(o):
                raise ValueError(f"scene object {i}: box {o.box()} leaves the frame margin "
                                 f"{MARGIN}; move it inward or make it smaller")
        return cls(objs, d["background"], d["pattern"])


def _check_name(value: Any, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is unknown; use one of: {', '.join(allowed)}")


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def apart(a: Obj, b: Obj, gap: float = GAP) -> bool:
    """True if the boxes of ``a`` and ``b`` are at least ``gap`` apart along x or y."""
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1) >= gap - 1e-9


def inside(o: Obj) -> bool:
    """True if ``o`` keeps ``MARGIN`` from every edge of the frame."""
    x0, y0, x1, y1 = o.box()
    return min(x0, y0, 1 - x1, 1 - y1) >= MARGIN - 1e-9


def relation(a: Obj, b: Obj) -> list[str]:
    """Which of RELATIONS hold for ``a`` relative to ``b`` (boxes strictly separated)."""
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    out = []
    if ax1 < bx0:
        out.append("left of")
    if ax0 > bx1:
        out.append("right of")
    if ay1 < by0:
        out.append("above")
    if ay0 > by1:
        out.append("below")
    return out


def relations(scene: Scene) -> list[dict[str, Any]]:
    """Every ``{"a": i, "relation": r, "b": j}`` that holds, for all ordered pairs."""
    out = []
    for i, a in enumerate(scene.objects):
        for j, b in enumerate(scene.objects):
            if i != j:
                out.extend({"a": i, "relation": r, "b": j} for r in relation(a, b))
    return out


def region(o: Obj) -> tuple[str, str]:
    """(row, column) third of the frame holding the centre: top/middle/bottom x left/centre/right.

    Two objects never share a region: their centres are at least 0.42 apart on some axis.
    """
    row = "top" if o.y < 1 / 3 else "bottom" if o.y > 2 / 3 else "middle"
    col = "left" if o.x < 1 / 3 else "right" if o.x > 2 / 3 else "centre"
    return row, col


# ---------------------------------------------------------------- sampling


def _spread(rng: random.Random, sizes: list[float], groups: list[list[int]],
            out: list[float]) -> bool:
    """Coordinates along one axis: ``groups`` (1 or 2, in order) are kept ``GAP`` apart."""
    widths = [max(sizes[i] for i in g) for g in groups]
    free = 1 - 2 * MARGIN - sum(widths) - GAP * (len(groups) - 1)
    if free < 0:
        return False
    bounds = [(MARGIN, 1 - MARGIN)]
    if len(groups) == 2:
        t = MARGIN + widths[0] + GAP / 2 + rng.uniform(0, free)  # the split between groups
        bounds = [(MARGIN, t - GAP / 2), (t + GAP / 2, 1 - MARGIN)]
    for g, (lo, hi) in zip(groups, bounds, strict=True):
        for i in g:
            out[i] = rng.uniform(lo + sizes[i] / 2, hi - sizes[i] / 2)
    return True


def place(rng: random.Random, sizes: list[str], tries: int = 40,
          accept: Any = None) -> list[tuple[float, float]] | None:
    """Centres for objects of ``sizes`` that keep apart and inside; None if none found.

    Objects go in one or two columns (or rows) along a random axis, at most two per column:
    columns are separated along the axis, objects sharing a column across it (three objects
    never fit in one line at these sizes). ``accept(objs)`` may add a constraint on the
    finished layout (e.g. a relation).
    """
    n = len(sizes)
    sides = [SIZES[s] for s in sizes]
    for _ in range(tries):
        order = list(range(n))
        rng.shuffle(order)
        if n == 1 or (n == 2 and rng.random() < 0.5):
            columns = [order]
        else:
            cut = n // 2 if n != 3 else rng.choice((1, 2))
            columns = [order[:cut], order[cut:]]
        primary, secondary = [0.0] * n, [0.0] * n
        if not _spread(rng, sides, columns, primary):
            continue
        ok = True
        for col in columns:
            rng.shuffle(col)
            across = [col] if len(col) == 1 else [[col[0]], [col[1]]]
            ok = ok and _spread(rng, sides, across, secondary)
        if not ok:
            continue
        xs, ys = (primary, secondary) if rng.random() < 0.5 else (secondary, primary)
        objs = [Obj("square", "red", s, round(x, 4), round(y, 4))
                for s, x, y in zip(sizes, xs, ys, strict=True)]
        if all(inside(o) for o in objs) and all(apart(objs[i], objs[j])
                                                for i, j in _pairs(n)):
            if accept is None or accept(objs):
                return [(o.x, o.y) for o in objs]
    return None


def sample_sizes(rng: random.Random, n: int) -> list[str]:
    """Sizes for ``n`` objects; crowded scenes lean small so a layout exists."""
    weights = {1: (1, 1, 1), 2: (2, 2, 1), 3: (3, 2, 1), 4: (4, 2, 1)}[n]
    return rng.choices(SIZE_ORDER, weights=weights, k=n)


def layout_objects(rng: random.Random, specs: list[tuple[str, str, str]],
                   accept: Any = None) -> tuple[Obj, ...]:
    """Place ``(shape, color, size)`` specs, shrinking the largest until a layout exists."""
    sizes = [s for _, _, s in specs]
    while True:
        centres = place(rng, sizes, accept=accept)
        if centres is not None:
            return tuple(Obj(sh, c, sz, x, y)
                         for (sh, c, _), sz, (x, y) in zip(specs, sizes, centres, strict=True))
        big = max(range(len(sizes)), key=lambda i: SIZE_ORDER.index(sizes[i]))
        if sizes[big] == "small":
            raise RuntimeError(f"no layout for {len(sizes)} small objects with this constraint")
        sizes[big] = SIZE_ORDER[SIZE_ORDER.index(sizes[big]) - 1]


def luma(rgb: RGB) -> float:
    """Grey level (ITU-R 601, as PIL's "L" conversion) of a colour."""
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def plain_ok(objects: tuple[Obj, ...], background: str) -> bool:
    """Whether the objects alone give a plain frame enough grey-level detail.

    A data contract checks grey entropy and Laplacian sharpness. A plain background is kept
    where the grey-level entropy the objects give a 2:1 frame (the widest bucket, where they
    cover least) is >= 0.62 bits, and some object differs from the background by >= 60 grey
    levels (yellow on a light background is nearly invisible in grey). Other scenes get a
    pattern, whose two tones carry the detail.
    """
    share: dict[int, float] = {}
    for o in objects:
        level = round(luma(COLORS[o.color]))
        share[level] = share.get(level, 0.0) + FILL[o.shape] * o.side ** 2 / 2
    probs = [*share.values(), 1 - sum(share.values())]
    entropy = -sum(p * math.log2(p) for p in probs if p > 0)
    base = luma(BACKGROUNDS[background][0])
    contrast = max(abs(luma(COLORS[o.color]) - base) for o in objects)
    return entropy >= 0.62 and contrast >= 60


def sample_background(rng: random.Random, objects: tuple[Obj, ...],
                      backgrounds: tuple[str, ...] = tuple(BACKGROUNDS),
                      patterns: tuple[str, ...] = PATTERNS) -> tuple[str, str]:
    """A background name and pattern from those given; plain is as likely as a pattern.

    Plain is dropped where not ``plain_ok``, unless it is the only pattern given: then the
    data contract's entropy and sharpness rules judge the frame.
    """
    background = rng.choice(backgrounds)
    if not plain_ok(objects, background):
        patterns = tuple(p for p in patterns if p != "plain") or patterns
    return background, rng.choice(patterns)


def check_world(backgrounds: Sequence[str], patterns: Sequence[str]) -> None:
    """Raise a ValueError naming an unknown background or pattern, or an empty choice."""
    if not backgrounds or not patterns:
        raise ValueError("the world needs at least one background and one pattern")
    for name in backgrounds:
        _check_name(name, tuple(BACKGROUNDS), "background")
    for name in patterns:
        _check_name(name, PATTERNS, "pattern")


def sample_scene(rng: random.Random, min_objects: int = 1, max_objects: int = MAX_OBJECTS,
                 backgrounds: tuple[str, ...] = tuple(BACKGROUNDS),
                 patterns: tuple[str, ...] = PATTERNS) -> Scene:
    """A random scene of ``min_objects`` to ``max_objects`` objects, on one of
    ``backgrounds`` with one of ``patterns`` (a recipe may narrow them at tiny sizes)."""
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"object counts {min_objects}..{max_objects} are invalid; need "
                         f"1 <= min_objects <= max_objects <= {MAX_OBJECTS}")
    check_world(backgrounds, patterns)
    n = rng.randint(min_objects, max_objects)
    specs = [(rng.choice(SHAPES), rng.choice(tuple(COLORS)), s) for s in sample_sizes(rng, n)]
    objects = layout_objects(rng, specs)
    background, pattern = sample_background(rng, objects, backgrounds, patterns)
    return Scene(objects, background, pattern)


# ---------------------------------------------------------------- rendering


def _star(x0: int, y0: int, side: int) -> list[tuple[float, float]]:
    """A five-pointed star, point up, scaled to span the box's width."""
    r = side / (2 * math.cos(math.radians(18)))  # tips at +-18 deg span 2 r cos 18 = side
    inner = r * 0.45
    cx = x0 + (side - 1) / 2
    cy = y0 + (side - 1) / 2 + (r - r * math.cos(math.radians(36))) / 2  # centre the height
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else inner
        ang = math.radians(-90 + 36 * k)
        px = cx + rad * math.cos(ang) * (side - 1) / side
        py = cy + rad * math.sin(ang) * (side - 1) / side
        # Clamp float error (a tip at x0 - 1e-15 rasterises one pixel outside the box).
        pts.append((min(max(px, x0), x0 + side - 1), min(max(py, y0), y0 + side - 1)))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int],
               fill: RGB) -> None:
    """Draw ``shape`` filling the end-exclusive pixel ``box`` in one flat colour."""
    x0, y0, x1, y1 = box
    xe, ye = x1 - 1, y1 - 1  # PIL boxes are inclusive
    cx, cy = (x0 + xe) / 2, (y0 + ye) / 2
    if shape == "square":
        draw.rectangle((x0, y0, xe, ye), fill=fill)
    elif shape == "circle":
        draw.ellipse((x0, y0, xe, ye), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, ye), (xe, ye), (cx, y0)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (xe, cy), (cx, ye), (x0, cy)], fill=fill)
    elif shape == "cross":
        side = x1 - x0
        arm = max(1, round(side * 0.36))
        a0 = x0 + (side - arm) // 2
        b0 = y0 + (side - arm) // 2
        draw.rectangle((a0, y0, a0 + arm - 1, ye), fill=fill)
        draw.rectangle((x0, b0, xe, b0 + arm - 1), fill=fill)
    elif shape == "star":
        draw.polygon(_star(x0, y0, x1 - x0), fill=fill)
    else:
        raise ValueError(f"shape {shape!r} is unknown; use one of: {', '.join(SHAPES)}")


def draw_background(draw: ImageDraw.ImageDraw, background: str, pattern: str,
                    width: int, height: int) -> None:
    """Fill the frame with the background's base tone and its pattern in the second tone."""
    base, alt = BACKGROUNDS[background]
    draw.rectangle((0, 0, width - 1, height - 1), fill=base)
    if pattern == "plain":
        return
    cell = max(2, round(min(width, height) / PATTERN_CELLS))
    if pattern == "horizontal stripes":
        for y in range(cell, height, 2 * cell):
            draw.rectangle((0, y, width - 1, y + cell - 1), fill=alt)
    elif pattern == "vertical stripes":
        for x in range(cell, width, 2 * cell):
            draw.rectangle((x, 0, x + cell - 1, height - 1), fill=alt)
    elif pattern == "checks":
        for row, y in enumerate(range(0, height, cell)):
            for x in range((row % 2) * cell, width, 2 * cell):
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=alt)
    else:
        raise ValueError(f"pattern {pattern!r} is unknown; use one of: {', '.join(PATTERNS)}")


def render(scene: Scene, width: int, height: int) -> Image.Image:
    """Render ``scene`` at ``width`` x ``height`` as an RGB image of exact palette colours."""
    if width < 1 or height < 1:
        raise ValueError(f"render size {width}x{height} is invalid; both sides must be >= 1")
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    draw_background(draw, scene.background, scene.pattern, width, height)
    for o in scene.objects:
        draw_shape(draw, o.shape, o.pixel_box(width, height), COLORS[o.color])
    return image
