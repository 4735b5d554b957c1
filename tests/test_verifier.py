"""The GenEval-style verifier: ground-truth renders pass, noise/blank/mismatched prompts fail."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from lens_model.data.captions import CATEGORIES, Prompt, prompt_set, satisfies
from lens_model.data.world import (
    BACKGROUNDS,
    COLORS,
    PATTERNS,
    SHAPES,
    Obj,
    Scene,
    draw_background,
    draw_shape,
    relation,
    render,
)
from lens_model.eval.verifier import Detection, detect, score, to_scene, verify

PROMPTS = prompt_set(20, seed=11)  # 120 prompts, 20 per category
SPEC = {"objects": [{"shape": "circle", "color": None, "count": 1}], "relation": None}


def run(prompts: list[Prompt], image_of, specs: list[dict] | None = None) -> dict[str, float]:
    """Score ``verify`` over prompts, each image made by ``image_of(prompt)``."""
    specs = specs or [p.spec for p in prompts]
    return score([(p.category, verify(image_of(p), s)[0])
                  for p, s in zip(prompts, specs, strict=True)])


def noisy(image: Image.Image, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image, dtype=np.float32)
    return np.clip(pixels + rng.normal(0, sigma, pixels.shape), 0, 255).round().astype(np.uint8)


def blank(background: str, pattern: str, w: int, h: int) -> Image.Image:
    image = Image.new("RGB", (w, h))
    draw_background(ImageDraw.Draw(image), background, pattern, w, h)
    return image


# ---------------------------------------------------------------- accuracy


@pytest.mark.parametrize("size", [(32, 32), (48, 24), (24, 48), (64, 64), (48, 48)])
def test_ground_truth_renders_pass(size: tuple[int, int]) -> None:
    result = run(PROMPTS, lambda p: render(p.scene, *size))
    assert set(result) == {*CATEGORIES, "overall"}
    assert result["overall"] >= 0.98, result


@pytest.mark.parametrize("side", [24, 48])
def test_mild_blur_still_passes(side: int) -> None:
    blur = ImageFilter.GaussianBlur(0.5)  # at 24 px it turns an 8 px star's points to mush
    result = run(PROMPTS, lambda p: render(p.scene, side, side).filter(blur))
    assert result["overall"] >= 0.95, result


def test_mild_noise_still_passes() -> None:
    result = run(PROMPTS, lambda p: noisy(render(p.scene, 48, 48), 10, PROMPTS.index(p)))
    assert result["overall"] >= 0.95, result


@pytest.mark.parametrize("side", [24, 48, 64])
def test_uniform_noise_images_fail(side: int) -> None:
    rng = np.random.default_rng(side)
    result = run(PROMPTS, lambda p: rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    assert result["overall"] <= 0.05, result


def test_blank_backgrounds_fail_and_hold_no_objects() -> None:
    combos = list(itertools.product(BACKGROUNDS, PATTERNS))
    for (background, pattern), (w, h) in itertools.product(combos, [(24, 48), (64, 64)]):
        assert detect(blank(background, pattern, w, h)) == [], (background, pattern, w, h)
    result = run(PROMPTS, lambda p: blank(*combos[PROMPTS.index(p) % len(combos)], 48, 48))
    assert result["overall"] <= 0.05, result


def test_mismatched_prompts_fail_and_agree_with_ground_truth() -> None:
    # Each image is judged against the next prompt's spec in its category; the ground-truth
    # scene rarely satisfies it, and the verifier must say exactly what satisfies says.
    n = len(PROMPTS) // len(CATEGORIES)
    specs = [PROMPTS[i - i % n + (i + 1) % n].spec for i in range(len(PROMPTS))]
    truth = [satisfies(s, p.scene) for p, s in zip(PROMPTS, specs, strict=True)]
    said = [verify(render(p.scene, 48, 48), s)[0] for p, s in zip(PROMPTS, specs, strict=True)]
    assert np.mean([a == b for a, b in zip(said, truth, strict=True)]) >= 0.98
    assert score([(p.category, ok) for p, ok in zip(PROMPTS, said, strict=True)])["overall"] \
        <= 0.2


# ---------------------------------------------------------------- detection


def test_detect_reads_a_known_render() -> None:
    objects = (Obj("star", "red", "large", 0.3, 0.3), Obj("triangle", "blue", "medium", 0.75, 0.3),
               Obj("circle", "green", "small", 0.25, 0.78),
               Obj("circle", "green", "small", 0.75, 0.78))
    scene = Scene(objects, "cream", "checks")
    found = detect(render(scene, 64, 48))
    assert sorted((d.color, d.shape) for d in found) == [
        ("blue", "triangle"), ("green", "circle"), ("green", "circle"), ("red", "star")]
    for d in found:
        o = min(scene.objects, key=lambda o: abs(o.x - d.center[0]) + abs(o.y - d.center[1]))
        x0, y0, x1, y1 = o.pixel_box(64, 48)
        assert (d.bbox[0], d.bbox[2]) == (x0, x1)  # every shape spans its box's width
        assert abs(d.center[0] * 64 - o.x * 64) <= 1 and abs(d.center[1] * 48 - o.y * 48) <= 1
        assert d.area > 0.3 * (x1 - x0) ** 2 and d.match > 0.8


@pytest.mark.parametrize("rgb", [(0, 200, 220), (200, 0, 120)])
def test_off_palette_colours_are_not_objects(rgb: tuple[int, int, int]) -> None:
    image = render(Scene((Obj("circle", "red", "small", 0.2, 0.2),), "cream", "plain"), 48, 48)
    draw_shape(ImageDraw.Draw(image), "square", (20, 20, 40, 40), rgb)  # cyan, magenta
    assert [(d.color, d.shape) for d in detect(image)] == [("red", "circle")]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_and_colour_at_the_smallest_size(shape: str) -> None:
    for color, background in zip(COLORS, itertools.cycle(BACKGROUNDS), strict=False):
        scene = Scene((Obj(shape, color, "small", 0.4, 0.6),), background, "vertical stripes")
        found = [(d.color, d.shape) for d in detect(render(scene, 24, 24))]
        assert found == [(color, shape)], (shape, color, background)


def test_to_scene_keeps_the_measured_side_for_relations() -> None:
    # An object far bigger than "large" gets that class, but its box is the measured one, so
    # two big overlapping-in-x objects are not "left of" each other.
    big = Detection("square", "red", (0, 0, 40, 40), (0.3125, 0.3125), 1600, 1.0)
    right = Detection("circle", "blue", (36, 30, 60, 54), (0.75, 0.65625), 450, 1.0)
    a, b = to_scene([big, right], 64, 64).objects
    assert a.size == "large" and a.side == pytest.approx(40 / 64)
    assert "left of" not in relation(a, b)
    small = to_scene([Detection("circle", "red", (0, 0, 11, 11), (0.1, 0.1), 90, 1.0)], 32, 32)
    assert small.objects[0].size == "small"


def test_verify_reason_names_found_and_asked() -> None:
    image = render(Scene((Obj("circle", "red", "medium", 0.5, 0.5),), "mint", "plain"), 32, 32)
    two = {"objects": [{"shape": "circle", "color": None, "count": 2}], "relation": None}
    assert verify(image, two) == (False, "fail: found 1 red circle; asked 2 circles")
    assert verify(image, SPEC) == (True, "pass: found 1 red circle; asked 1 circle")
    rel = {"objects": [{"shape": "circle", "color": None, "count": 1},
                       {"shape": "star", "color": "blue", "count": 1}],
           "relation": {"a": 0, "type": "left of", "b": 1}}
    ok, reason = verify(image, rel)
    assert not ok and "red circle at (0.5" in reason and "circle left of star" in reason


def test_score_averages_categories_not_items() -> None:
    result = score([("counting", True), ("counting", False), ("counting", False),
                    ("colors", True)])
    assert result == {"counting": pytest.approx(1 / 3), "colors": 1.0,
                      "overall": pytest.approx(2 / 3)}


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("image, words", [
    (np.zeros((32, 32, 3), dtype=np.float32), "astype"),
    (np.zeros((32, 32), dtype=np.uint8), "HxWx3"),
    (np.zeros((32, 32, 4), dtype=np.uint8), "alpha"),
    (Image.new("RGBA", (32, 32)), "convert('RGB')"),
    (Image.new("RGB", (16, 32)), ">= 24"),
    ([[0, 0, 0]], "numpy array"),
])
def test_bad_images_raise(image: object, words: str) -> None:
    with pytest.raises(ValueError, match="image") as err:
        verify(image, SPEC)
    assert words in str(err.value)


@pytest.mark.parametrize("spec, words", [
    ({}, "'objects' list"),
    ({"objects": [{"shape": "hexagon", "color": None, "count": 1}]}, "objects[0]: shape"),
    ({"objects": [{"shape": "star", "color": "white", "count": 1}]}, "color 'white'"),
    ({"objects": [{"shape": "star", "color": None, "count": "2"}]}, "count '2'"),
    ({"objects": [{"shape": "star", "color": None, "count": 1}],
      "relation": {"a": 0, "type": "near", "b": 1}}, "relation"),
])
def test_bad_specs_raise(spec: dict, words: str) -> None:
    with pytest.raises(ValueError, match="spec") as err:
        verify(np.zeros((32, 32, 3), dtype=np.uint8), spec)
    assert words in str(err.value)


def test_score_takes_the_reasoner_sets_wordings_as_categories() -> None:
    result = score([("arithmetic", True), ("language", False), ("colors", True)])
    assert result == {"colors": 1.0, "arithmetic": 1.0, "language": 0.0,
                      "overall": pytest.approx(2 / 3)}


def test_bad_score_input_raises() -> None:
    with pytest.raises(ValueError, match="'math'.*use one of: single_object"):
        score([("counting", True), ("math", False)])
    with pytest.raises(ValueError, match="no results"):
        score([])
    with pytest.raises(ValueError, match=r"results\[0\].*pair"):
        score([("counting",)])
