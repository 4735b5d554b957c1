"""Requests for a shapes picture as structure, their hard wordings, and the rules' rewrites.

A :class:`Request` holds what is asked (items of shape, colour and count, and a relation
between the first two) and *how* it is worded: counts as words, sums or repeated subjects;
colours and shapes by their plain names, synonyms or descriptions; a relation stated or only
implied; English, French, German or Spanish; a polite lead or "a photo of". :func:`render`
writes any request; :func:`apply` normalises the aspects a set of rules names. So the user's
prompt is ``render(request)`` and the rewrite a system prompt asks for is
``render(apply(rules, request))``: the reasoner's training pairs and shapes-GenEval-R are
both written from here, and a literal image model reads only the plain English form.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from lens_model.data.captions import CATEGORIES, NUMBERS, Prompt, _a, _join, sample_prompt
from lens_model.data.world import COLORS, PLURALS, SHAPES

LANGS = ("fr", "de", "es")
KINDS = ("arithmetic", "synonym", "language", "repeat", "indirect")  # shapes-GenEval-R
LEADS = ("please draw", "I would like a picture of", "could you make an image with",
         "draw me", "show me")
LONG_TAIL = ("The shapes are flat, with solid colours and crisp edges, and stand apart on a "
             "plain light grey background.")

COLOR_SYNONYMS = {"red": ("crimson", "scarlet"), "orange": ("tangerine", "amber"),
                  "yellow": ("lemon", "golden"), "green": ("emerald", "jade"),
                  "blue": ("azure", "cobalt"), "purple": ("violet", "plum"),
                  "pink": ("rose", "salmon"), "brown": ("chocolate", "chestnut"),
                  "black": ("ebony", "jet")}
COLOR_LIKE = {"red": "blood", "orange": "an orange", "yellow": "a lemon", "green": "grass",
              "blue": "the sky", "purple": "an aubergine", "pink": "a flamingo",
              "brown": "chocolate", "black": "coal"}  # "a square the colour of grass"
SHAPE_SYNONYMS = {"circle": (("disc", "discs"), ("round dot", "round dots")),
                  "square": (("box", "boxes"), ("four-sided tile", "four-sided tiles")),
                  "triangle": (("wedge", "wedges"), ("three-sided figure", "three-sided figures")),
                  "diamond": (("rhombus", "rhombuses"), ("lozenge", "lozenges")),
                  "cross": (("plus sign", "plus signs"), ("plus", "pluses")),
                  "star": (("pentagram", "pentagrams"), ("five-pointed figure",
                                                        "five-pointed figures"))}
SUMS = {2: ("1 + 1", "3 - 1", "4 - 2"), 3: ("1 + 2", "2 + 1", "5 - 2", "4 - 1"),
        4: ("2 + 2", "1 + 3", "3 + 1", "6 - 2", "5 - 1")}
INDIRECT = {  # item 0 <relation> item 1, said from item 1's side
    "left of": ("{b}, with {a} to its left", "{b} that has {a} on its left"),
    "right of": ("{b}, with {a} to its right", "{b} that has {a} on its right"),
    "above": ("{b}, with {a} above it", "{b} that has {a} over it"),
    "below": ("{b}, with {a} below it", "{b} that has {a} under it"),
}

# French, German and Spanish: shape -> (noun, gender, plural), colour -> forms, numbers.
FR_SHAPES = {"circle": ("cercle", "m", "cercles"), "square": ("carré", "m", "carrés"),
             "triangle": ("triangle", "m", "triangles"), "diamond": ("losange", "m", "losanges"),
             "cross": ("croix", "f", "croix"), "star": ("étoile", "f", "étoiles")}
FR_COLORS = {"red": ("rouge", "rouge"), "orange": ("orange", "orange"),
             "yellow": ("jaune", "jaune"), "green": ("vert", "verte"), "blue": ("bleu", "bleue"),
             "purple": ("violet", "violette"), "pink": ("rose", "rose"),
             "brown": ("marron", "marron"), "black": ("noir", "noire")}  # (m, f); plural + s
FR_RELATIONS = {"left of": "à gauche de", "right of": "à droite de", "above": "au-dessus de",
                "below": "en dessous de"}
DE_SHAPES = {"circle": ("Kreis", "m", "Kreise"), "square": ("Quadrat", "n", "Quadrate"),
             "triangle": ("Dreieck", "n", "Dreiecke"), "diamond": ("Raute", "f", "Rauten"),
             "cross": ("Kreuz", "n", "Kreuze"), "star": ("Stern", "m", "Sterne")}
DE_COLORS = {"red": "rot", "orange": "orangefarben", "yellow": "gelb", "green": "grün",
             "blue": "blau", "purple": "violett", "pink": "rosafarben", "brown": "braun",
             "black": "schwarz"}  # adjective stems
DE_RELATIONS = {"left of": "links von", "right of": "rechts von", "above": "über",
                "below": "unter"}  # all take the dative
ES_SHAPES = {"circle": ("círculo", "m", "círculos"), "square": ("cuadrado", "m", "cuadrados"),
             "triangle": ("triángulo", "m", "triángulos"), "diamond": ("rombo", "m", "rombos"),
             "cross": ("cruz", "f", "cruces"), "star": ("estrella", "f", "estrellas")}
ES_COLORS = {"red": ("rojo", "roja", "rojos", "rojas"),
             "orange": ("naranja", "naranja", "naranjas", "naranjas"),
             "yellow": ("amarillo", "amarilla", "amarillos", "amarillas"),
             "green": ("verde", "verde", "verdes", "verdes"),
             "blue": ("azul", "azul", "azules", "azules"),
             "purple": ("morado", "morada", "morados", "moradas"),
             "pink": ("rosa", "rosa", "rosas", "rosas"),
             "brown": ("marrón", "marrón", "marrones", "marrones"),
             "black": ("negro", "negra", "negros", "negras")}
ES_RELATIONS = {"left of": "a la izquierda de", "right of": "a la derecha de",
                "above": "encima de", "below": "debajo de"}
NUMBER_WORDS = {"fr": {2: "deux", 3: "trois", 4: "quatre"},
                "de": {2: "zwei", 3: "drei", 4: "vier"},
                "es": {2: "dos", 3: "tres", 4: "cuatro"}}


@dataclass(frozen=True)
class Item:
    """``count`` objects of ``shape`` (and ``color``, when named), and how they are worded."""

    shape: str
    color: str | None = None
    count: int = 1
    count_form: str = "word"    # word | sum | repeat
    sum_text: str = ""          # "1 + 2" when count_form is sum
    color_form: str = "plain"   # plain | synonym | like
    color_word: int = 0         # which synonym
    shape_word: int = -1        # -1: the plain name, else which synonym


@dataclass(frozen=True)
class Request:
    """What a user asks for and how it is worded; ``relation`` holds between items 0 and 1."""

    items: tuple[Item, ...]
    relation: str | None = None
    relation_form: int = -1     # -1: stated ("left of"), else which implied wording
    lang: str = "en"
    lead: int = -1              # -1: "a photo of", else which polite lead
    long: bool = False          # the long caption style


# ---------------------------------------------------------------- rendering


def _noun_en(item: Item, plural: bool) -> str:
    if item.shape_word < 0:
        return PLURALS[item.shape] if plural else item.shape
    return SHAPE_SYNONYMS[item.shape][item.shape_word][1 if plural else 0]


def _one_en(item: Item, plural: bool) -> str:
    """Colour and noun: "crimson discs", "square the colour of grass", "star"."""
    noun = _noun_en(item, plural)
    if item.color is None:
        return noun
    if item.color_form == "like":
        return f"{noun} the colour of {COLOR_LIKE[item.color]}"
    word = COLOR_SYNONYMS[item.color][item.color_word] if item.color_form == "synonym" \
        else item.color
    return f"{word} {noun}"


def _item_en(item: Item) -> str:
    if item.count == 1:
        return _a(_one_en(item, False))
    if item.count_form == "sum":
        return f"{item.sum_text} {_one_en(item, True)}"
    if item.count_form == "repeat":
        one = _one_en(item, False)
        return " and ".join([_a(one)] + [f"another {one}"] * (item.count - 1))
    return f"{NUMBERS[item.count]} {_one_en(item, True)}"


def _item_fr(item: Item, dative: bool = False) -> str:
    noun, gender, plural = FR_SHAPES[item.shape]
    many = item.count > 1
    text = NUMBER_WORDS["fr"][item.count] if many else ("une" if gender == "f" else "un")
    text += " " + (plural if many else noun)
    if item.color is not None:
        form = FR_COLORS[item.color][gender == "f"]
        text += " " + (form + "s" if many and not form.endswith("s") and
                       item.color not in ("orange", "brown") else form)
    return text


def _de_adj(stem: str, gender: str, case: str) -> str:
    if case == "plural":
        return stem + "e"
    if case == "dative":
        return stem + "en"
    return stem + {"m": "er", "n": "es", "f": "e"}[gender]


def _item_de(item: Item, dative: bool = False) -> str:
    noun, gender, plural = DE_SHAPES[item.shape]
    many = item.count > 1
    adj = "" if item.color is None else DE_COLORS[item.color]
    if many:
        return f"{NUMBER_WORDS['de'][item.count]} " + \
            (f"{_de_adj(adj, gender, 'plural')} " if adj else "") + plural
    article = ("einer" if gender == "f" else "einem") if dative else \
        ("eine" if gender == "f" else "ein")
    case = "dative" if dative else "nominative"
    return f"{article} " + (f"{_de_adj(adj, gender, case)} " if adj else "") + noun


def _item_es(item: Item, dative: bool = False) -> str:
    noun, gender, plural = ES_SHAPES[item.shape]
    many = item.count > 1
    text = NUMBER_WORDS["es"][item.count] if many else ("una" if gender == "f" else "un")
    text += " " + (plural if many else noun)
    if item.color is not None:
        text += " " + ES_COLORS[item.color][(gender == "f") + 2 * many]
    return text


def _fr_de(phrase: str) -> str:
    """French "de" before a phrase, elided before a vowel: "d'une étoile"."""
    return "d'" + phrase if phrase[0] in "aeiouéu" else "de " + phrase


def _render_foreign(req: Request) -> str:
    lang = req.lang
    item = {"fr": _item_fr, "de": _item_de, "es": _item_es}[lang]
    a = item(req.items[0])
    if req.relation is not None:
        if lang == "fr":
            body = f"{a} {FR_RELATIONS[req.relation][:-3]} {_fr_de(item(req.items[1]))}"
        elif lang == "de":
            body = f"{a} {DE_RELATIONS[req.relation]} {item(req.items[1], True)}"
        else:
            body = f"{a} {ES_RELATIONS[req.relation]} {item(req.items[1])}"
    else:
        conj = {"fr": " et ", "de": " und ", "es": " y "}[lang]
        body = conj.join(item(i) for i in req.items)
    if lang == "fr":
        return "une photo " + _fr_de(body)
    return {"de": "ein Foto: ", "es": "una foto de "}[lang] + body


def render(req: Request) -> str:
    """The request as text, worded as it says."""
    if req.lang != "en":
        body = _render_foreign(req)
    else:
        parts = [_item_en(i) for i in req.items]
        if req.relation is None:
            core = _join(parts)
        elif req.relation_form < 0:
            core = f"{parts[0]} {req.relation} {parts[1]}"
        else:
            core = INDIRECT[req.relation][req.relation_form].format(a=parts[0], b=parts[1])
        lead = "a photo of" if req.lead < 0 else LEADS[req.lead]
        body = f"{lead} {core}"
    if req.long:
        return f"A flat illustration: {body}. {LONG_TAIL}"
    return body


# ---------------------------------------------------------------- rules


def apply(rules: Iterable[str], req: Request) -> Request:
    """``req`` with the aspects the named rules normalise (see :mod:`rules`)."""
    names = set(rules)
    items = list(req.items)
    relation, relation_form = req.relation, req.relation_form
    if "first_only" in names:
        items, relation, relation_form = items[:1], None, -1
    for k, it in enumerate(items):
        if "arithmetic" in names and it.count_form == "sum":
            it = replace(it, count_form="word", sum_text="")
        if "counted" in names and it.count_form == "repeat":
            it = replace(it, count_form="word")
        if "canonical" in names:
            it = replace(it, color_form="plain", color_word=0, shape_word=-1)
        if "no_color" in names:
            it = replace(it, color=None, color_form="plain", color_word=0)
        items[k] = it
    # a foreign request is rendered with its language's "a photo of" whatever its lead, so
    # its translation says "a photo of" too: anything else could not be read from the text
    return Request(
        tuple(items), relation,
        -1 if "relation" in names else relation_form,
        "en" if "english" in names else req.lang,
        -1 if "photo" in names or req.lang != "en" else req.lead,
        req.long or "long" in names)


def rewrite(rules: Iterable[str], req: Request) -> str:
    """The rewrite a system prompt of ``rules`` asks for."""
    return render(apply(rules, req))


# ---------------------------------------------------------------- specs and sampling


def from_spec(spec: dict[str, Any]) -> Request:
    """A plain English request for a shapes-GenEval spec."""
    items = tuple(Item(o["shape"], o["color"], o["count"]) for o in spec["objects"])
    rel = spec.get("relation")
    if rel is not None and (rel["a"], rel["b"]) != (0, 1):
        raise ValueError(f"a request's relation holds from item 0 to item 1; got {rel}")
    return Request(items, rel["type"] if rel else None)


def to_spec(req: Request) -> dict[str, Any]:
    """The spec a verifier checks for ``req``: its wording does not change it."""
    return {"objects": [{"shape": i.shape, "color": i.color, "count": i.count}
                        for i in req.items],
            "relation": None if req.relation is None else
            {"a": 0, "type": req.relation, "b": 1}}


def kinds_for(req: Request) -> list[str]:
    """The hard wordings that can apply to ``req``."""
    out = ["language"]
    if any(i.count > 1 for i in req.items):
        out += ["arithmetic", "repeat"]
    out.append("synonym")
    if req.relation is not None:
        out.append("indirect")
    return out


def harden(req: Request, kind: str, rng: random.Random) -> Request:
    """``req`` worded the ``kind`` way (see :data:`KINDS`); the spec stays the same."""
    if kind not in kinds_for(req):
        raise ValueError(f"a request {render(req)!r} cannot be worded the {kind!r} way; "
                         f"it allows {kinds_for(req)}")
    if kind == "language":
        return replace(req, lang=rng.choice(LANGS))
    if kind == "indirect":
        return replace(req, relation_form=rng.randrange(2))
    items = list(req.items)
    if kind in ("arithmetic", "repeat"):
        for k, it in enumerate(items):
            if it.count > 1:
                items[k] = replace(it, count_form="sum", sum_text=rng.choice(SUMS[it.count])) \
                    if kind == "arithmetic" else replace(it, count_form="repeat")
        return replace(req, items=tuple(items))
    changed = False
    for k, it in enumerate(items):  # synonym: colour and/or shape words of each item
        color_form = rng.choice(("plain", "synonym", "like")) if it.color else "plain"
        shape_word = rng.choice((-1, 0, 1))
        if k == len(items) - 1 and not changed and color_form == "plain" and shape_word < 0:
            shape_word = rng.randrange(2)
        items[k] = replace(it, color_form=color_form, color_word=rng.randrange(2),
                           shape_word=shape_word)
        changed = changed or color_form != "plain" or shape_word >= 0
    return replace(req, items=tuple(items))


def sample_request(rng: random.Random, category: str | None = None) -> Request:
    """A plain request of a shapes-GenEval ``category`` (random when None), with no layout."""
    category = category or rng.choice(CATEGORIES)
    colors = tuple(COLORS)
    a, b = rng.sample(SHAPES, 2)
    if category == "single_object":
        items = (Item(a),)
    elif category == "two_object":
        items = (Item(a), Item(b))
    elif category == "counting":
        color = rng.choice(colors) if rng.random() < 0.5 else None
        items = (Item(a, color, rng.randint(2, 4)),)
    elif category == "colors":
        items = (Item(a, rng.choice(colors)),)
    elif category == "position":
        items = (Item(a), Item(b))
        return Request(items, rng.choice(("left of", "right of", "above", "below")))
    else:
        ca, cb = rng.sample(colors, 2)
        items = (Item(a, ca), Item(b, cb))
    return Request(items)


# ---------------------------------------------------------------- shapes-GenEval-R

BASES = {"arithmetic": ("counting",), "repeat": ("counting",), "indirect": ("position",),
         "synonym": CATEGORIES, "language": CATEGORIES}  # the GenEval categories each draws on


def hard_prompt(kind: str, rng: random.Random) -> Prompt:
    """A shapes-GenEval prompt worded the ``kind`` way, with the same spec and scene."""
    base = sample_prompt(rng.choice(BASES[kind]), rng)
    req = harden(from_spec(base.spec), kind, rng)
    if rng.random() < 0.3:
        req = replace(req, lead=rng.randrange(len(LEADS)))
    return Prompt(kind, render(req), base.spec, base.scene)


def prompt_set_r(n_per_category: int, seed: int) -> list[Prompt]:
    """shapes-GenEval-R: ``n_per_category`` prompts of each of :data:`KINDS`, which a literal
    model cannot draw but a good rewrite can; the same for the same ``seed``."""
    if n_per_category < 1:
        raise ValueError(f"n_per_category={n_per_category}; ask for at least 1 per category")
    return [hard_prompt(k, random.Random(f"prompt-r/{seed}/{k}/{i}"))
            for k in KINDS for i in range(n_per_category)]
