"""Captions for shapes-world scenes: long descriptive captions and short GenEval-style prompts.

Long captions (about 110 words, like Lens-800M's GPT-4.1 captions) describe the whole scene:
every object's colour, shape, size and place in the frame, relations between objects, the
background and the composition. Their grammar is drawn by the rng (openings, sentence frames,
orderings, synonyms, optional true details), so no fixed template can be keyed on; a length
target drawn per caption decides how many optional details are added. Captions never name a
shape or an object colour that is not in the scene.

Short prompts follow GenEval's six categories and wording ("a photo of ..."); each comes with
a JSON-able ``spec`` of what must be verified and a ground-truth ``scene`` that satisfies it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from lens_model.data.world import (
    COLORS,
    PLURALS,
    SHAPES,
    SIZE_ORDER,
    Obj,
    Scene,
    layout_objects,
    region,
    relation,
    sample_background,
    sample_sizes,
)

# ---------------------------------------------------------------- phrase banks

SIZE_WORDS = {"small": ("small", "small", "little"), "medium": ("medium-sized", "mid-sized",
              "medium"), "large": ("large", "large", "big")}
SIZE_NOUNS = {"small": "small", "medium": "medium", "large": "large"}  # "small in scale"
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
REL_WORDS = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "higher than", "over"),
    "below": ("below", "beneath", "lower than", "under"),
}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SHAPE_DETAILS = {
    "circle": ("with a smooth round edge", "with an even outline"),
    "square": ("with four equal sides", "with straight, even sides"),
    "triangle": ("pointing upward", "with its tip at the top"),
    "diamond": ("standing on one point", "turned on its corner"),
    "cross": ("shaped like a plus sign", "with four equal arms"),
    "star": ("with five sharp points", "with five points"),
}
SHAPE_FACTS = {
    "circle": ("The {ref} has a smooth, even outline.", "The {ref} is a clean, round disc."),
    "square": ("The {ref} sits upright with level edges.", "The {ref} has four equal sides."),
    "triangle": ("The {ref} points straight up, with a flat base.",
                 "The {ref} rests on its flat base and tapers to a single tip."),
    "diamond": ("The {ref} balances on one point, like a tilted tile.",
                "The {ref} is turned so one corner points up and one points down."),
    "cross": ("The {ref} has two bars of equal length crossing at the middle.",
              "The {ref} looks like a bold plus sign."),
    "star": ("The {ref} has five points, one aimed straight up.",
             "The {ref} is a classic five-pointed star."),
}
PLACE_VERBS_1 = ("sits", "rests", "is placed", "appears", "is positioned", "can be seen")
PLACE_VERBS_N = ("sit", "rest", "are placed", "appear", "are arranged", "are scattered")
STYLE_WORDS = ("flat", "minimal", "simple", "clean", "flat-colour")
MEDIUM_WORDS = ("illustration", "graphic", "digital image", "picture", "composition", "render")
BG_NOUNS = ("background", "backdrop", "background")
PATTERN_ADJ = {"horizontal stripes": ("horizontally striped", "striped"),
               "vertical stripes": ("vertically striped", "striped"),
               "checks": ("checkered", "chequered")}
RATIOS = ((2, 1), (16, 9), (3, 2), (4, 3), (1, 1))


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def word_count(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------- scene phrases


def position_phrase(o: Obj, rng: random.Random) -> str:
    """Where ``o`` is in the frame, e.g. "in the upper left" or "on the right side"."""
    row, col = region(o)
    if row == "middle" and col == "centre":
        return rng.choice(("in the centre", "at the centre of the frame", "right in the middle",
                           "in the middle of the image"))
    if row == "middle":
        return rng.choice((f"on the {col} side", f"halfway down the {col} side",
                           f"in the middle of the {col} side", f"toward the {col} edge",
                           f"at the middle {col}"))
    vert = {"top": ("upper", "top"), "bottom": ("lower", "bottom")}[row]
    if col == "centre":
        return rng.choice((f"at the {row} centre", f"near the {row} edge in the middle",
                           f"in the {vert[0]} middle", f"centred along the {row}"))
    v = rng.choice(vert)
    return rng.choice((f"in the {v} {col}", f"in the {v}-{col} corner", f"near the {v} {col}",
                       f"toward the {v} {col} of the frame", f"in the {v}-{col} area"))


def _where(o: Obj) -> str:
    """A short fixed location that tells apart objects of the same colour and shape."""
    row, col = region(o)
    if row == "middle":
        return "in the centre" if col == "centre" else f"on the {col}"
    if col == "centre":
        return f"at the {row}"
    return f"in the {'upper' if row == 'top' else 'lower'} {col}"


class _Namer:
    """Definite references ("the red circle"), with a location where colour+shape repeat."""

    def __init__(self, scene: Scene) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        for o in scene.objects:
            self.counts[(o.color, o.shape)] = self.counts.get((o.color, o.shape), 0) + 1

    def ref(self, o: Obj) -> str:
        base = f"the {o.color} {o.shape}"
        return base if self.counts[(o.color, o.shape)] == 1 else f"{base} {_where(o)}"


def describe(o: Obj, rng: random.Random, detail: bool = True) -> str:
    """An indefinite description: size, colour, shape and sometimes a shape detail."""
    text = f"{rng.choice(SIZE_WORDS[o.size])} {o.color} {o.shape}"
    if detail and rng.random() < 0.25:
        text += " " + rng.choice(SHAPE_DETAILS[o.shape])
    return _a(text)


def aspect_phrase(width: int, height: int, rng: random.Random) -> str:
    """The frame's format, e.g. "wide 16:9 landscape frame" or "square canvas"."""
    r = width / height
    w, h = min(RATIOS, key=lambda p: abs(math.log(p[0] / p[1]) - abs(math.log(r))))
    if (w, h) == (1, 1):
        # Never the word "square": it would name a shape that may not be in the scene.
        return rng.choice(("1:1 frame", "1:1 format", "frame as tall as it is wide",
                           "evenly proportioned 1:1 canvas"))
    if r > 1:
        return rng.choice((f"wide {w}:{h} landscape frame", f"horizontal {w}:{h} format",
                           "landscape-oriented frame", f"{w}:{h} landscape canvas"))
    return rng.choice((f"tall {h}:{w} portrait frame", f"vertical {h}:{w} format",
                       "portrait-oriented frame", f"{h}:{w} portrait canvas"))


def background_phrase(scene: Scene, rng: random.Random) -> str:
    """e.g. "plain cream background" or "checkered mint backdrop"."""
    noun = rng.choice(BG_NOUNS)
    if scene.pattern == "plain":
        return f"{rng.choice(('plain', 'solid', 'flat', 'uniform'))} {scene.background} {noun}"
    return f"{rng.choice(PATTERN_ADJ[scene.pattern])} {scene.background} {noun}"


def background_sentence(scene: Scene, rng: random.Random) -> str:
    bg = scene.background
    if scene.pattern == "plain":
        return rng.choice((
            f"The background is a plain, even {bg} with no texture.",
            f"Behind everything lies a flat {bg} backdrop, free of any pattern.",
            f"The backdrop is solid {bg} from edge to edge.",
            f"All of this rests on a uniform {bg} background.",
        ))
    if scene.pattern == "checks":
        return rng.choice((
            f"The background is a soft {bg} checkerboard of light and slightly darker tiles.",
            f"Behind everything, a {bg} backdrop is checkered in two close tones.",
            f"A chequered {bg} pattern of alternating pale and darker cells fills the backdrop.",
        ))
    way = "horizontal" if scene.pattern == "horizontal stripes" else "vertical"
    return rng.choice((
        f"The background is {bg} with broad {way} stripes in a slightly darker shade.",
        f"Behind everything, {bg} bands alternate with darker ones in {way} stripes.",
        f"A {bg} backdrop with even {way} stripes runs across the whole frame.",
    ))


def _spacing(scene: Scene) -> float:
    """The smallest gap between two objects' boxes, in short-side fractions."""
    gaps = []
    objs = scene.objects
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            a, b = objs[i].box(), objs[j].box()
            gaps.append(max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]))
    return min(gaps)


def composition_sentences(scene: Scene, width: int, height: int, rng: random.Random,
                          with_aspect: bool) -> list[str]:
    """Framing and spacing, and the format unless the opening already gave it."""
    objs = scene.objects
    out = []
    if with_aspect:
        fmt = aspect_phrase(width, height, rng)
        out.append(rng.choice((f"The image uses {_a(fmt)}.", f"It is composed in {_a(fmt)}.",
                               f"The picture is set in {_a(fmt)}.")))
    if len(objs) == 1:
        what = f"the {objs[0].shape}"
        row, col = region(objs[0])
        lean = [w for w in (col, row) if w not in ("centre", "middle")]
    else:
        what = rng.choice(("the group", "the arrangement", "the set of shapes"))
        mx = sum(o.x for o in objs) / len(objs)
        my = sum(o.y for o in objs) / len(objs)
        lean = [w for w, hit in (("left", mx < 0.4), ("right", mx > 0.6),
                                 ("top", my < 0.4), ("bottom", my > 0.6)) if hit]
    if lean:
        side = " ".join(reversed(lean)) if len(lean) == 2 else lean[0]
        side = side.replace("top ", "upper ").replace("bottom ", "lower ")
        frame = rng.choice((f"The framing is off-centre, with {what} weighted toward the {side}",
                            f"{_cap(what)} sits toward the {side} of the frame"))
    else:
        frame = rng.choice((f"The framing is balanced, with {what} near the centre",
                            f"{_cap(what)} is centred in the frame"))
    if len(objs) == 1:
        out.append(frame + rng.choice((", leaving open space around it.",
                                       ", with nothing else nearby.",
                                       ", surrounded by empty background.")))
        return out
    gap = _spacing(scene)
    if gap < 0.15:
        space = ("The shapes sit close together without touching.",
                 "Only narrow strips of background separate the shapes.")
    elif gap < 0.3:
        space = ("The shapes are spaced with moderate gaps between them.",
                 "Comfortable gaps separate the shapes.")
    else:
        space = ("The shapes are spread well apart, with wide gaps between them.",
                 "Plenty of empty space separates the shapes.")
    out += [frame + ".", rng.choice(space)]
    return out


def _pick(rng: random.Random, frames: list[str], used: set[int]) -> str:
    """A frame not yet used in this caption (by index), so sentences do not repeat."""
    fresh = [i for i in range(len(frames)) if i not in used] or list(range(len(frames)))
    i = rng.choice(fresh)
    used.add(i)
    return frames[i]


def object_sentence(o: Obj, rng: random.Random, first: bool, used: set[int]) -> str:
    """One sentence giving ``o``'s size, colour, shape and place."""
    pos = position_phrase(o, rng)
    desc = describe(o, rng)
    verb = rng.choice(PLACE_VERBS_1)
    frames = [
        f"{_cap(desc)} {verb} {pos}.",
        f"{_cap(pos)}, there is {desc}.",
        f"{_cap(pos)} {rng.choice(('is', 'sits', 'lies'))} {desc}.",
        f"The {o.color} {o.shape} is {rng.choice(SIZE_WORDS[o.size])} and {verb} {pos}.",
        f"There is {desc} {pos}.",
        f"{_cap(_a(o.color + ' ' + o.shape))}, {SIZE_NOUNS[o.size]} in scale, "
        f"{verb} {pos}.",
    ]
    if not first:
        frames.append(f"Another shape, {desc}, {verb} {pos}.")
    return _pick(rng, frames, used)


def list_sentence(objs: list[Obj], rng: random.Random) -> str:
    """All objects in one sentence, each with its place; left to right where that is strict."""
    objs = sorted(objs, key=lambda o: o.x)
    parts = [f"{describe(o, rng, detail=False)} {position_phrase(o, rng)}" for o in objs]
    in_row = all("left of" in relation(a, b) for a, b in zip(objs, objs[1:], strict=False))
    if not in_row or rng.random() < 0.4:
        return rng.choice(("The scene contains ", "It shows ", "The shapes are ")) + \
            _join(parts) + "."
    if len(parts) == 2:
        return f"Reading from left to right, there is {parts[0]} and then {parts[1]}."
    return "Reading from left to right, there is " + \
        ", then ".join(parts[:-1]) + ", and finally " + parts[-1] + "."


def relation_sentences(scene: Scene, names: _Namer, rng: random.Random) -> list[str]:
    """True relations along a random chain through the objects (n-1 pairs)."""
    objs = list(scene.objects)
    rng.shuffle(objs)
    out: list[str] = []
    used: set[int] = set()
    for a, b in zip(objs, objs[1:], strict=False):
        rels = relation(a, b)  # never empty: objects are apart along x or y
        rel = rng.choice(rels)
        if len(rels) == 2 and rng.random() < 0.4:
            h = next(r for r in rels if r in ("left of", "right of"))
            v = next(r for r in rels if r in ("above", "below"))
            phrase = f"{v} and {rng.choice(REL_WORDS[h][1:])}"
        else:
            phrase = rng.choice(REL_WORDS[rel])
        ra, rb = names.ref(a), names.ref(b)
        inv = rng.choice(REL_WORDS[INVERSE[rel]])
        out.append(_pick(rng, [
            f"{_cap(ra)} is {phrase} {rb}.",
            f"{_cap(ra)} {rng.choice(('sits', 'lies', 'appears'))} {phrase} {rb}.",
            f"Seen together, {ra} is {phrase} {rb}.",
            f"{_cap(rb)} is {inv} {ra}.",
            f"In relation to each other, {rb} lies {inv} {ra}.",
        ], used))
    return out


def optional_sentences(scene: Scene, names: _Namer, rng: random.Random) -> list[str]:
    """True extra details, one per kind, to add while a caption is under its length target."""
    objs = scene.objects
    n = len(objs)
    colors = sorted({o.color for o in objs}, key=list(COLORS).index)
    out = [
        rng.choice(("It is rendered in a flat graphic style: solid colours and hard edges, "
                    "with no gradients, shadows or outlines.",
                    "Every shape is filled with a single solid colour and has crisp edges.",
                    "The look is minimal and vector-like, without texture, lighting or depth.")),
        rng.choice(("There is no text, border or watermark anywhere in the image.",
                    "Nothing else appears: no text, no people and no scenery.",
                    "No lettering or other marks are present.")),
        rng.choice(("The view is straight on and completely flat, like a diagram.",
                    "There is no perspective; everything is seen face on.")),
    ]
    o = rng.choice(objs)
    out.append(rng.choice(SHAPE_FACTS[o.shape]).format(ref=names.ref(o)[4:]))
    if n == 1:
        out.append(f"Apart from the background, the only colour is {colors[0]}.")
        out.append(f"The {objs[0].shape} is the only object in the image.")
        return out
    counts: dict[str, int] = {}
    for o in objs:
        counts[o.shape] = counts.get(o.shape, 0) + 1
    kinds = [f"{NUMBERS[c]} {PLURALS[s] if c > 1 else s}" for s, c in counts.items()]
    if len(kinds) == 1:
        plural = PLURALS[objs[0].shape]
        every = "both" if n == 2 else "all"
        out.append(f"In total there are {NUMBERS[n]} objects, {every} of them {plural}.")
    else:
        out.append(f"In total there are {NUMBERS[n]} objects: {_join(kinds)}.")
    if len(colors) == 1:
        out.append(f"Every shape shares the same colour, {colors[0]}.")
    else:
        out.append(rng.choice((f"The colours used are {_join(colors)}.",
                               f"The palette of the shapes is {_join(colors)}.")))
    sizes = [o.size for o in objs]
    if len(set(sizes)) == 1:
        every = "Both" if n == 2 else f"All {NUMBERS[n]}"
        out.append(f"{every} shapes are the same size: {SIZE_NOUNS[sizes[0]]}.")
    else:
        big = max(objs, key=lambda o: SIZE_ORDER.index(o.size))
        small = min(objs, key=lambda o: SIZE_ORDER.index(o.size))
        if sizes.count(big.size) == 1 and sizes.count(small.size) == 1:
            out.append(f"{_cap(names.ref(big))} is the largest shape, and {names.ref(small)} "
                       "the smallest.")
    out.append(rng.choice(("None of the shapes overlap or touch one another.",
                           "Each shape stands apart, with background visible between them.")))
    return out


def opening(scene: Scene, width: int, height: int, rng: random.Random) -> tuple[str, bool, bool]:
    """The first sentence, and whether it named the background and the format."""
    objs = scene.objects
    n = len(objs)
    if n == 1:
        o = objs[0]
        what = rng.choice(("a single shape", "one shape", f"a lone {o.color} {o.shape}",
                           f"a single {rng.choice(SIZE_WORDS[o.size])} {o.color} {o.shape}"))
        verb = rng.choice(PLACE_VERBS_1)
    else:
        num = NUMBERS[n]
        what = rng.choice((f"{num} shapes", f"{num} simple shapes", f"{num} flat geometric shapes",
                           f"a group of {num} shapes", f"{num} colourful figures"))
        verb = "is arranged" if what.startswith("a group") else rng.choice(PLACE_VERBS_N)
    bg = background_phrase(scene, rng)
    fmt = aspect_phrase(width, height, rng)
    style, medium = rng.choice(STYLE_WORDS), rng.choice(MEDIUM_WORDS)
    frames = [
        (f"{_cap(_a(style + ' ' + medium))} of {what} on {_a(bg)}.", True, False),
        (f"This {fmt} shows {what} against {_a(bg)}.", True, True),
        (f"{_cap(what)} {verb} on {_a(bg)}.", True, False),
        (f"On {_a(bg)}, {what} {verb}.", True, False),
        (f"Against {_a(bg)}, {what} {verb}.", True, False),
        (f"The image, {_a(fmt)}, contains {what}.", False, True),
        (f"Here, {what} {verb} within {_a(fmt)}.", False, True),
        (f"Shown in {_a(fmt)}, {what} {verb} on {_a(bg)}.", True, True),
        (f"{_cap(_a(fmt))} holds {what} and nothing else.", False, True),
        (f"{_cap(_a(style + ' ' + medium))} in {_a(fmt)} presents {what}.", False, True),
    ]
    return rng.choice(frames)


def long_caption(scene: Scene, width: int, height: int, rng: random.Random) -> str:
    """A ~110-word caption of ``scene`` rendered at ``width`` x ``height``."""
    names = _Namer(scene)
    first, said_bg, said_fmt = opening(scene, width, height, rng)
    objs = list(scene.objects)
    order = rng.choice(("random", "left-right", "size"))
    if order == "left-right":
        objs.sort(key=lambda o: o.x)
    elif order == "size":
        objs.sort(key=lambda o: -SIZE_ORDER.index(o.size))
    else:
        rng.shuffle(objs)
    if len(objs) > 1 and rng.random() < 0.1 + 0.15 * len(objs):
        body = [list_sentence(objs, rng)]
    else:
        used: set[int] = set()
        body = [object_sentence(o, rng, i == 0, used) for i, o in enumerate(objs)]
    body += relation_sentences(scene, names, rng) if len(objs) > 1 else []
    setting = composition_sentences(scene, width, height, rng, with_aspect=not said_fmt)
    if not said_bg or rng.random() < 0.3:
        setting.insert(rng.randrange(len(setting) + 1), background_sentence(scene, rng))
    parts = [first, *body, *setting] if rng.random() < 0.6 else [first, *setting, *body]
    # Optional true details go in at random places until the drawn length target is reached.
    target = min(140, max(85, rng.gauss(110, 10)))
    words = sum(word_count(p) for p in parts)
    extras = optional_sentences(scene, names, rng)
    rng.shuffle(extras)
    for extra in extras:
        w = word_count(extra)
        if abs(words + w - target) < abs(words - target):
            parts.insert(rng.randrange(1, len(parts) + 1), extra)
            words += w
    return " ".join(parts)


def short_caption(scene: Scene, rng: random.Random, color_prob: float = 0.75,
                  relation_prob: float = 0.5) -> str:
    """A GenEval-worded prompt that is true of the whole ``scene``.

    e.g. "a photo of two red circles and a blue star", "a photo of three circles" or "a photo
    of a black cross left of a pink square". Colours are named with ``color_prob`` (GenEval's
    single-object, two-object, counting and position prompts name none); a scene of two objects
    of different kinds names a relation that holds between them with ``relation_prob``. A model
    trained on a mix of these and long captions reads evaluation prompts as in-distribution.
    """
    with_color = rng.random() < color_prob
    groups: dict[tuple[str, str], list[Obj]] = {}
    for o in scene.objects:
        groups.setdefault((o.color if with_color else "", o.shape), []).append(o)
    parts = []
    for (color, shape), objs in groups.items():
        n = len(objs)
        noun = f"{color} {PLURALS[shape] if n > 1 else shape}".strip()
        parts.append(f"{NUMBERS[n]} {noun}" if n > 1 else _a(noun))
    order = list(range(len(parts)))
    rng.shuffle(order)
    if len(groups) == 2 and len(scene.objects) == 2 and rng.random() < relation_prob:
        a, b = (scene.objects[i] for i in order)
        rels = relation(a, b)  # never empty: objects are apart along x or y
        return f"a photo of {parts[order[0]]} {rng.choice(rels)} {parts[order[1]]}"
    return "a photo of " + _join([parts[i] for i in order])


# ---------------------------------------------------------------- GenEval-style prompts

CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position",
                               "color_attr")
POSITION_RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Prompt:
    """A short prompt, the spec a verifier checks, and a scene that satisfies it."""

    category: str
    text: str
    spec: dict[str, Any]
    scene: Scene


def _item(shape: str, color: str | None = None, count: int = 1) -> dict[str, Any]:
    return {"shape": shape, "color": color, "count": count}


def satisfies(spec: dict[str, Any], scene: Scene) -> bool:
    """Whether ``scene`` meets ``spec``: exact counts per item, and the relation if any.

    An item counts scene objects of its shape (and colour, when given); the relation must hold
    between some object matching item ``a`` and some object matching item ``b``.
    """
    def matches(o: Obj, item: dict[str, Any]) -> bool:
        return o.shape == item["shape"] and item["color"] in (None, o.color)

    items = spec["objects"]
    for item in items:
        if sum(matches(o, item) for o in scene.objects) != item["count"]:
            return False
    rel = spec.get("relation")
    if rel is None:
        return True
    return any(rel["type"] in relation(a, b)
               for a in scene.objects if matches(a, items[rel["a"]])
               for b in scene.objects if matches(b, items[rel["b"]]))


def _scene_for(rng: random.Random, specs: list[tuple[str, str]], accept: Any = None) -> Scene:
    """A ground-truth scene of ``(shape, colour)`` objects with sampled sizes and layout."""
    sizes = sample_sizes(rng, len(specs))
    objects = layout_objects(rng, [(s, c, z) for (s, c), z in zip(specs, sizes, strict=True)],
                             accept=accept)
    background, pattern = sample_background(rng, objects)
    return Scene(objects, background, pattern)


def sample_prompt(category: str, rng: random.Random) -> Prompt:
    """A GenEval-style prompt of ``category`` with its spec and a scene satisfying it."""
    if category not in CATEGORIES:
        raise ValueError(f"prompt category {category!r} is unknown; use one of: "
                         f"{', '.join(CATEGORIES)}")
    colors = tuple(COLORS)
    relation_spec = None
    accept = None
    if category == "single_object":
        shape = rng.choice(SHAPES)
        text = f"a photo of {_a(shape)}"
        items = [_item(shape)]
        objs = [(shape, rng.choice(colors))]
    elif category == "two_object":
        a, b = rng.sample(SHAPES, 2)
        text = f"a photo of {_a(a)} and {_a(b)}"
        items = [_item(a), _item(b)]
        objs = [(a, rng.choice(colors)), (b, rng.choice(colors))]
    elif category == "counting":
        shape, count = rng.choice(SHAPES), rng.randint(2, 4)
        text = f"a photo of {NUMBERS[count]} {PLURALS[shape]}"
        items = [_item(shape, count=count)]
        objs = [(shape, rng.choice(colors)) for _ in range(count)]
    elif category == "colors":
        shape, color = rng.choice(SHAPES), rng.choice(colors)
        text = f"a photo of {_a(color + ' ' + shape)}"
        items = [_item(shape, color)]
        objs = [(shape, color)]
    elif category == "position":
        a, b = rng.sample(SHAPES, 2)
        rel = rng.choice(POSITION_RELATIONS)
        text = f"a photo of {_a(a)} {rel} {_a(b)}"
        items = [_item(a), _item(b)]
        objs = [(a, rng.choice(colors)), (b, rng.choice(colors))]
        relation_spec = {"a": 0, "type": rel, "b": 1}

        def accept(placed: list[Obj], rel: str = rel) -> bool:
            # Only the asked relation holds, so the scene reads one way.
            return relation(placed[0], placed[1]) == [rel]
    else:  # color_attr
        a, b = rng.sample(SHAPES, 2)
        ca, cb = rng.sample(colors, 2)
        text = f"a photo of {_a(ca + ' ' + a)} and {_a(cb + ' ' + b)}"
        items = [_item(a, ca), _item(b, cb)]
        objs = [(a, ca), (b, cb)]
    spec = {"objects": items, "relation": relation_spec}
    return Prompt(category, text, spec, _scene_for(rng, objs, accept))


def prompt_set(n_per_category: int, seed: int) -> list[Prompt]:
    """``n_per_category`` prompts of each category, the same for the same ``seed``."""
    if n_per_category < 1:
        raise ValueError(f"n_per_category={n_per_category}; ask for at least 1 per category")
    return [sample_prompt(c, random.Random(f"prompt/{seed}/{c}/{i}"))
            for c in CATEGORIES for i in range(n_per_category)]
