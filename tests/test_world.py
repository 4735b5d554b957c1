"""Shapes world: scenes, rendering, relations, long captions, GenEval-style prompts, items."""

from __future__ import annotations

import io
import itertools
import json
import random
import re
import statistics
from collections import deque

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lens_model.buckets import Bucket, make_buckets
from lens_model.data.captions import (
    CATEGORIES,
    NUMBERS,
    Prompt,
    long_caption,
    prompt_set,
    sample_prompt,
    satisfies,
    short_caption,
    word_count,
)
from lens_model.data.shapes import make_items
from lens_model.data.world import (
    BACKGROUNDS,
    COLORS,
    PATTERNS,
    PLURALS,
    RELATIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    draw_shape,
    plain_ok,
    region,
    relation,
    relations,
    render,
    sample_scene,
)

# The tiny recipe's buckets (bases 32/48/64, ratios 1:2..2:1, multiple 8): 24x48 ... 96x48.
TINY = make_buckets([32, 48, 64], ["1:2", "9:16", "2:3", "3:4", "1:1", "4:3", "3:2", "16:9",
                                   "2:1"], 8)
BG_TONES = {t for pair in BACKGROUNDS.values() for t in pair}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def mask_of(image: Image.Image, rgb: tuple[int, int, int]) -> np.ndarray:
    return (pixels(image) == np.array(rgb, dtype=np.uint8)).all(axis=-1)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of ``mask``, each as a boolean mask."""
    seen = np.zeros_like(mask)
    out = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask)
        queue = deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            comp[y, x] = True
            for dy, dx in itertools.product((-1, 0, 1), repeat=2):
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(comp)
    return out


def scenes(n: int, seed: int = 0, lo: int = 1, hi: int = 4) -> list[Scene]:
    return [sample_scene(random.Random(f"test/{seed}/{i}"), lo, hi) for i in range(n)]


# ---------------------------------------------------------------- the world


def test_palette_shapes_and_colours_stay_apart():
    assert len(SHAPES) >= 6 and len(COLORS) >= 8
    assert "hexagon" not in SHAPES and "white" not in COLORS
    objs = list(COLORS.values())
    assert min(np.linalg.norm(np.subtract(a, b)) for a, b in itertools.combinations(objs, 2)) > 60
    # Background tones are far from every object colour, so segmentation cannot confuse them.
    assert min(np.linalg.norm(np.subtract(a, t)) for a in objs for t in BG_TONES) > 85


@pytest.mark.parametrize("side", [8, 10, 12, 16])
def test_shapes_distinct_and_inside_their_box_at_small_sizes(side):
    masks = {}
    for shape in SHAPES:
        im = Image.new("L", (side + 6, side + 6), 0)
        draw_shape(ImageDraw.Draw(im), shape, (3, 3, 3 + side, 3 + side), 255)
        m = np.asarray(im) > 0
        ys, xs = np.nonzero(m)
        assert xs.min() >= 3 and ys.min() >= 3 and xs.max() < 3 + side and ys.max() < 3 + side
        masks[shape] = m
    for a, b in itertools.combinations(SHAPES, 2):
        assert (masks[a] != masks[b]).sum() >= side, (a, b)


@pytest.mark.parametrize("lo,hi", [(1, 4), (1, 1), (2, 3), (4, 4)])
def test_scene_counts_names_and_bounds(lo, hi):
    got = scenes(150, lo=lo, hi=hi)
    counts = {len(s.objects) for s in got}
    assert counts == set(range(lo, hi + 1))
    for s in got:
        assert s.background in BACKGROUNDS and s.pattern in PATTERNS
        for o in s.objects:
            assert o.shape in SHAPES and o.color in COLORS and o.size in SIZES
            x0, y0, x1, y1 = o.box()
            assert min(x0, y0) > 0 and max(x1, y1) < 1


def test_scene_sampler_uses_the_whole_vocabulary():
    objs = [o for s in scenes(400) for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.color for o in objs} == set(COLORS)
    assert {o.size for o in objs} == set(SIZES)
    got = scenes(400)
    assert {s.background for s in got} == set(BACKGROUNDS)
    assert {s.pattern for s in got} == set(PATTERNS)
    assert {region(o) for o in objs} == {(r, c) for r in ("top", "middle", "bottom")
                                          for c in ("left", "centre", "right")}


def test_a_narrowed_world_draws_only_its_backgrounds_and_patterns():
    full = [sample_scene(random.Random(f"n/{i}")) for i in range(100)]
    same = [sample_scene(random.Random(f"n/{i}"), 1, 4, tuple(BACKGROUNDS), PATTERNS)
            for i in range(100)]
    assert same == full  # the defaults are the whole world, draw for draw
    got = [sample_scene(random.Random(f"n/{i}"), 1, 4, ("cream", "mint"), ("plain",))
           for i in range(200)]
    assert {s.background for s in got} == {"cream", "mint"}
    assert {s.pattern for s in got} == {"plain"}  # even where plain_ok is false
    assert any(not plain_ok(s.objects, s.background) for s in got)
    striped = [sample_scene(random.Random(f"n/{i}"), 1, 4, ("cream",), ("plain", "checks"))
               for i in range(200)]
    assert all(s.pattern == "checks" for s in striped if not plain_ok(s.objects, "cream"))
    with pytest.raises(ValueError, match="background 'teal' is unknown"):
        sample_scene(random.Random(0), 1, 4, ("teal",))
    with pytest.raises(ValueError, match="pattern 'dots' is unknown"):
        sample_scene(random.Random(0), 1, 4, ("cream",), ("dots",))


def test_bad_counts_and_dicts_are_refused_with_the_item_named():
    with pytest.raises(ValueError, match="min_objects"):
        sample_scene(random.Random(0), 3, 2)
    d = scenes(1, hi=2)[0].to_dict()
    d["objects"][0]["color"] = "teal"
    with pytest.raises(ValueError, match=r"scene object 0: color 'teal' is unknown"):
        Scene.from_dict(d)
    d = {"objects": [Obj("circle", "red", "large", 0.5, 0.5).to_dict(),
                     Obj("star", "blue", "small", 0.6, 0.6).to_dict()],
         "background": "cream", "pattern": "plain"}
    with pytest.raises(ValueError, match="objects 0 and 1"):
        Scene.from_dict(d)
    with pytest.raises(ValueError, match="background 'black'"):
        Scene.from_dict({**d, "background": "black"})


def test_to_dict_round_trips_through_json():
    for s in scenes(50):
        assert Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s


@pytest.mark.parametrize("size", [(24, 48), (40, 24), (64, 64), (96, 48), (1024, 512),
                                  (17, 91), (3, 2)])
def test_render_gives_the_requested_size_in_rgb(size):
    im = render(scenes(1, seed=size[0])[0], *size)
    assert im.mode == "RGB" and im.size == size


def test_render_is_flat_palette_colours_with_one_component_per_object():
    sizes = [(b.width, b.height) for b in TINY] + [(200, 100), (100, 300)]
    for i, s in enumerate(scenes(60, seed=1)):
        w, h = sizes[i % len(sizes)]
        im = render(s, w, h)
        colours = {tuple(c) for c in pixels(im).reshape(-1, 3)}
        used = {COLORS[o.color] for o in s.objects} | set(BACKGROUNDS[s.background])
        assert colours <= used  # nothing but exact palette colours (no anti-aliasing)
        background = np.zeros((h, w), bool)
        for tone in BACKGROUNDS[s.background]:
            background |= mask_of(im, tone)
        # Objects never touch: one connected component per object, each inside its box.
        comps = components(~background)
        assert len(comps) == len(s.objects)
        for o in s.objects:
            x0, y0, x1, y1 = o.pixel_box(w, h)
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            inside = [c for c in comps if c[y0:y1, x0:x1].any()]
            assert len(inside) == 1 and inside[0][y0:y1, x0:x1].sum() == inside[0].sum()
            assert (mask_of(im, COLORS[o.color]) & inside[0]).sum() == inside[0].sum()


def test_every_palette_colour_and_background_tone_appears_exactly():
    objs = (Obj("square", "red", "small", 0.25, 0.25), Obj("star", "red", "small", 0.75, 0.75))
    for name, rgb in COLORS.items():
        for bg, pattern in itertools.product(BACKGROUNDS, PATTERNS):
            s = Scene(tuple(Obj(o.shape, name, o.size, o.x, o.y) for o in objs), bg, pattern)
            im = render(s, 40, 24)
            assert mask_of(im, rgb).sum() > 0
            base, alt = BACKGROUNDS[bg]
            assert mask_of(im, base).sum() > 0
            assert (mask_of(im, alt).sum() > 0) == (pattern != "plain")


def test_relations_by_hand():
    a = Obj("circle", "red", "small", 0.25, 0.5)
    b = Obj("star", "blue", "small", 0.75, 0.5)
    c = Obj("cross", "green", "small", 0.75, 0.2)
    assert relation(a, b) == ["left of"] and relation(b, a) == ["right of"]
    assert relation(b, c) == []  # boxes overlap along y and share x: no relation
    d = Obj("square", "black", "small", 0.25, 0.2)
    e = Obj("triangle", "pink", "small", 0.75, 0.78)
    assert relation(d, e) == ["left of", "above"]
    assert relation(e, d) == ["right of", "below"]
    rels = relations(Scene((a, b), "cream", "plain"))
    assert rels == [{"a": 0, "relation": "left of", "b": 1},
                    {"a": 1, "relation": "right of", "b": 0}]


def test_relations_hold_in_pixels_at_every_aspect():
    for i, s in enumerate(scenes(40, seed=2, lo=2)):
        for w, h in [(24, 48), (96, 48), (64, 64), (300, 100)]:
            boxes = [o.pixel_box(w, h) for o in s.objects]
            for r in relations(s):
                a, b = boxes[r["a"]], boxes[r["b"]]
                assert {"left of": a[2] <= b[0], "right of": a[0] >= b[2],
                        "above": a[3] <= b[1], "below": a[1] >= b[3]}[r["relation"]], (i, r)
        # Every pair is related somehow, since objects are apart along x or y.
        pairs = {(r["a"], r["b"]) for r in relations(s)}
        n = len(s.objects)
        assert pairs == {(p, q) for p in range(n) for q in range(n) if p != q}


# ---------------------------------------------------------------- long captions


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_long_caption_statistics_and_content():
    counts, openings = [], set()
    for i, s in enumerate(scenes(500, seed=3)):
        rng = random.Random(i)
        b = rng.choice(TINY)
        text = long_caption(s, b.width, b.height, rng)
        counts.append(word_count(text))
        openings.add(" ".join(text.split()[:5]))
        words = _words(text)
        for o in s.objects:
            assert o.color in words and o.shape in words, (o, text)
        assert set(s.background.split()) <= words
        # It never names a shape or an object colour that is not in the scene.
        absent = ({sh for sh in SHAPES if sh not in {o.shape for o in s.objects}} |
                  {PLURALS[sh] for sh in SHAPES if sh not in {o.shape for o in s.objects}} |
                  {c for c in COLORS if c not in {o.color for o in s.objects}})
        assert not words & absent, (words & absent, text)
    assert 100 <= statistics.mean(counts) <= 120
    assert statistics.pstdev(counts) > 5
    assert len(openings) > 150


def test_long_caption_states_positions_relations_and_format():
    s = Scene((Obj("circle", "red", "small", 0.2, 0.2), Obj("star", "blue", "large", 0.7, 0.7)),
              "mint", "checks")
    texts = [long_caption(s, 96, 48, random.Random(i)) for i in range(40)]
    for t in texts:
        assert "mint" in t and ("checker" in t or "chequer" in t)
        assert "red circle" in t and "blue star" in t
    joined = " ".join(texts)
    assert "landscape" in joined or "2:1" in joined
    assert "portrait" not in joined
    assert "left of the red circle" not in joined and "below the blue star" not in joined
    assert "left of the blue star" in joined or "above the blue star" in joined
    assert re.search(r"(upper|top)[ -]left", joined)


# ---------------------------------------------------------------- GenEval-style prompts


def test_prompts_of_every_category_satisfied_by_their_scenes():
    prompts = prompt_set(25, seed=7)
    assert [p.category for p in prompts] == [c for c in CATEGORIES for _ in range(25)]
    for p in prompts:
        assert isinstance(p, Prompt) and p.text.startswith("a photo of ")
        assert json.loads(json.dumps(p.spec)) == p.spec
        assert satisfies(p.spec, p.scene), (p.text, p.scene)
        items = p.spec["objects"]
        assert len(p.scene.objects) == sum(i["count"] for i in items)
        for item in items:
            assert item["shape"] in p.text or PLURALS[item["shape"]] in p.text
            if item["color"]:
                assert item["color"] in p.text
        if p.category == "counting":
            assert 2 <= items[0]["count"] <= 4 and len({o.shape for o in p.scene.objects}) == 1
        if p.category == "position":
            rel = p.spec["relation"]
            assert rel["type"] in p.text
            # Scene objects follow the spec's order; only the asked relation holds.
            assert relation(p.scene.objects[0], p.scene.objects[1]) == [rel["type"]]
        else:
            assert p.spec["relation"] is None
        if p.category == "color_attr":
            assert len({i["color"] for i in items}) == 2 and len({i["shape"] for i in items}) == 2
    assert prompt_set(25, seed=7) == prompts and prompt_set(25, seed=8) != prompts


def test_geneval_wording_and_spec_mismatches():
    texts = {p.category: p.text for p in prompt_set(1, seed=0)}
    assert re.fullmatch(r"a photo of an? [a-z]+", texts["single_object"])
    assert re.fullmatch(r"a photo of (two|three|four) [a-z]+", texts["counting"])
    assert re.fullmatch(r"a photo of an? [a-z]+ (left of|right of|above|below) an? [a-z]+",
                        texts["position"])
    p = sample_prompt("counting", random.Random(1))
    more = {"objects": [{**p.spec["objects"][0], "count": p.spec["objects"][0]["count"] + 1}],
            "relation": None}
    assert not satisfies(more, p.scene)
    q = sample_prompt("position", random.Random(2))
    flipped = {**q.spec, "relation": {**q.spec["relation"], "a": 1, "b": 0}}
    assert not satisfies(flipped, q.scene)
    with pytest.raises(ValueError, match="prompt category 'spatial'"):
        sample_prompt("spatial", random.Random(0))


# ---------------------------------------------------------------- the data source


def test_make_items_is_deterministic_by_seed_and_index():
    full = list(make_items(5, 0, 12, TINY, 1, 4))
    again = list(make_items(5, 0, 12, TINY, 1, 4))
    part = list(make_items(5, 7, 12, TINY, 1, 4))
    assert [(i.key, i.image, i.caption, i.meta) for i in full] == \
        [(i.key, i.image, i.caption, i.meta) for i in again]
    assert [(i.image, i.caption) for i in full[7:]] == [(i.image, i.caption) for i in part]
    other = list(make_items(6, 0, 12, TINY, 1, 4))
    assert all(a.image != b.image or a.caption != b.caption for a, b in zip(full, other,
                                                                            strict=True))


def test_make_items_yields_images_captions_and_verifiable_meta():
    items = list(make_items(0, 100, 140, TINY, 2, 3))
    assert [i.key for i in items] == [f"shapes-{k:09d}" for k in range(100, 140)]
    for item in items:
        assert item.source == "shapes" and not item.problems
        meta = json.loads(json.dumps(item.meta))
        im = Image.open(io.BytesIO(item.image))
        assert im.format == "PNG" and im.size == (meta["width"], meta["height"])
        assert Bucket(meta["width"], meta["height"], 0).name in {b.name for b in TINY}
        scene = Scene.from_dict(meta["scene"])
        assert 2 <= len(scene.objects) <= 3
        assert meta["relations"] == relations(scene)
        assert np.array_equal(pixels(im), pixels(render(scene, im.width, im.height)))
        caption = item.caption.decode()
        assert all(o.color in caption and o.shape in caption for o in scene.objects)
    assert len({(i.meta["width"], i.meta["height"]) for i in items}) > 5


def test_make_items_on_a_narrowed_world():
    items = list(make_items(0, 0, 30, TINY, 1, 4, ("light grey",), ("plain",)))
    for item in items:
        scene = Scene.from_dict(item.meta["scene"])
        assert (scene.background, scene.pattern) == ("light grey", "plain")
        assert "light grey" in item.caption.decode()


def test_make_items_refuses_bad_arguments():
    with pytest.raises(ValueError, match="no buckets"):
        list(make_items(0, 0, 1, [], 1, 4))
    with pytest.raises(ValueError, match=r"slice \[5, 2\)"):
        list(make_items(0, 5, 2, TINY, 1, 4))
    with pytest.raises(ValueError, match="object counts 0..4"):
        list(make_items(0, 0, 1, TINY, 0, 4))
    with pytest.raises(ValueError, match="16x16"):
        list(make_items(0, 0, 1, [Bucket(16, 16, 16)], 1, 4))


def test_short_captions_are_true_of_their_scenes() -> None:
    """Every object is named with its count (and colour, when colours are named); a stated
    relation holds; both wordings and relations all occur."""
    seen = {"colour": 0, "plain": 0, "relation": 0}
    for i in range(400):
        rng = random.Random(i)
        scene = sample_scene(rng)
        text = short_caption(scene, rng)
        assert text.startswith("a photo of ")
        body = text.removeprefix("a photo of ")
        rel = next((r for r in RELATIONS if f" {r} " in body), None)
        named_colour = any(f" {c} " in f" {body} " for c in COLORS)
        seen["colour" if named_colour else "plain"] += 1
        if rel:
            seen["relation"] += 1
            left, right = body.split(f" {rel} ")
            def named(o: Obj, phrase: str, colour: bool) -> bool:
                return phrase.endswith(f"{o.color} {o.shape}" if colour else o.shape)

            a = next(o for o in scene.objects if named(o, left, named_colour))
            b = next(o for o in scene.objects if o is not a and named(o, right, named_colour))
            assert rel in relation(a, b), (text, scene)
        for shape in SHAPES:
            group = [o for o in scene.objects if o.shape == shape]
            if not group:
                assert shape not in body.replace("crosses", "cross"), (text, scene)
                continue
            for colour in {o.color for o in group} if named_colour else {None}:
                n = sum(colour in (None, o.color) for o in group)
                noun = PLURALS[shape] if n > 1 else shape
                phrase = " ".join(w for w in (colour, noun) if w)
                assert (f"{NUMBERS[n]} {phrase}" if n > 1 else phrase) in body, (text, scene)
    assert min(seen.values()) > 20, seen
