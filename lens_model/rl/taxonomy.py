"""RL prompt taxonomies: category -> sub-category -> items, loaded from YAML and validated.

A taxonomy file (``configs/taxonomy/NAME.yaml``, or any path) holds ``world`` (``shapes``: the
grammar backend can write exact prompts and rubrics; ``open``: an LLM writes them) and
``categories``. A sub-category is a list of items, or a mapping with ``items`` and default
keys for them. An open-world item is a plain name ("golden retriever"); a shapes-world item
is a mapping of the shapes, colours, ... its prompts are about (configs/taxonomy/shapes.yaml
lists the keys). Errors name the file and the exact branch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lens_model.data.world import COLORS, RELATIONS, SHAPES, SIZE_ORDER
from lens_model.recipe import CONFIG_DIR

DIMENSIONS: tuple[str, ...] = ("attribute", "spatial relation", "count", "interaction", "colour")
WORLDS = ("shapes", "open")
# shapes-world item keys -> what a value may be drawn from (None: whole numbers 2..4)
SHAPE_KEYS: dict[str, tuple[Any, ...] | None] = {
    "shapes": SHAPES, "colors": tuple(COLORS), "partners": SHAPES,
    "partner_colors": tuple(COLORS), "sizes": SIZE_ORDER, "counts": None,
    "relations": RELATIONS, "dimensions": DIMENSIONS, "require": DIMENSIONS,
}
SHAPE_DEFAULTS: dict[str, list[Any]] = {
    "shapes": list(SHAPES), "colors": list(COLORS), "partners": list(SHAPES),
    "partner_colors": list(COLORS), "sizes": list(SIZE_ORDER), "counts": [2, 3, 4],
    "relations": list(RELATIONS), "dimensions": list(DIMENSIONS), "require": [],
}


class TaxonomyError(ValueError):
    """A taxonomy that cannot be used; the message names the file, the branch and the fix."""


@dataclass(frozen=True)
class Item:
    """One leaf: prompts are written about it, and train/gold are split by its ``id``."""

    category: str
    subcategory: str
    name: str
    data: dict[str, Any] = field(default_factory=dict)  # shapes world: resolved keys

    @property
    def id(self) -> str:
        return f"{self.category}/{self.subcategory}/{self.name}"


@dataclass(frozen=True)
class Taxonomy:
    name: str
    world: str
    path: Path
    items: tuple[Item, ...]


def resolve(name_or_path: str | Path) -> Path:
    """``configs/taxonomy/NAME.yaml`` for a name, else the path itself."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise TaxonomyError(f"taxonomy file {path} does not exist")
        return path
    candidate = CONFIG_DIR / "taxonomy" / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "taxonomy").glob("*.yaml"))
        raise TaxonomyError(f"unknown taxonomy {str(name_or_path)!r}; known: {', '.join(known)} "
                            "(or pass a path to a .yaml file)")
    return candidate


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or "/" in value:
        raise TaxonomyError(f"{where}: name {value!r} must be a non-empty string without '/' "
                            "(ids join names with '/')")
    return value.strip()


def _shape_item(raw: Any, defaults: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """Validate one shapes-world item against its sub-category's defaults."""
    if not isinstance(raw, dict):
        raise TaxonomyError(f"{where}: a shapes-world item is a mapping with 'name' and its "
                            f"keys ({', '.join(SHAPE_KEYS)}); got {raw!r}")
    name = _name(raw.get("name"), where)
    where = f"{where} item {name!r}"
    data = {**SHAPE_DEFAULTS, **defaults}
    for key, value in raw.items():
        if key == "name":
            continue
        if key not in SHAPE_KEYS:
            raise TaxonomyError(f"{where}: unknown key {key!r}; allowed: name, "
                                f"{', '.join(SHAPE_KEYS)}")
        data[key] = value
    for key, allowed in SHAPE_KEYS.items():
        values = data[key]
        if not isinstance(values, list) or (not values and key != "require"):
            raise TaxonomyError(f"{where}: {key} must be a non-empty list; got {values!r}")
        for v in values:
            ok = (isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 4) \
                if allowed is None else v in allowed
            if not ok:
                hint = "whole numbers 2 to 4" if allowed is None else ", ".join(allowed)
                raise TaxonomyError(f"{where}: {key} entry {v!r} is not in the shapes world; "
                                    f"use {hint}")
    missing = [d for d in data["require"] if d not in data["dimensions"]]
    if missing:
        raise TaxonomyError(f"{where}: require {missing} is not among its dimensions "
                            f"{data['dimensions']}; add it there or drop it from require")
    return name, data


def parse(tree: Any, source: str, path: Path = Path(".")) -> Taxonomy:
    """Validate a loaded taxonomy ``tree``; ``source`` names it in errors."""
    where = f"taxonomy {source}"
    if not isinstance(tree, dict) or not isinstance(tree.get("categories"), dict):
        raise TaxonomyError(f"{where}: needs a mapping with 'world' ({' or '.join(WORLDS)}) and "
                            "'categories' (category -> sub-category -> items)")
    unknown = set(tree) - {"world", "categories", "description"}
    if unknown:
        raise TaxonomyError(f"{where}: unknown top-level keys {sorted(unknown)}; allowed: "
                            "world, categories, description")
    world = tree.get("world", "open")
    if world not in WORLDS:
        raise TaxonomyError(f"{where}: world {world!r} is unknown; use one of {', '.join(WORLDS)}")
    if not tree["categories"]:
        raise TaxonomyError(f"{where} has no categories; add at least one")
    items: list[Item] = []
    for cat, subs in tree["categories"].items():
        cat = _name(cat, f"{where} category")
        at_cat = f"{where}: category {cat!r}"
        if not isinstance(subs, dict) or not subs:
            raise TaxonomyError(f"{at_cat} has no sub-categories; add a mapping of "
                                "sub-category -> items, or remove it")
        for sub, body in subs.items():
            sub = _name(sub, f"{at_cat} sub-category")
            at_sub = f"{at_cat} sub-category {sub!r}"
            defaults: dict[str, Any] = {}
            if isinstance(body, dict):
                defaults = {k: v for k, v in body.items() if k != "items"}
                body = body.get("items")
                if world == "open" and defaults:
                    raise TaxonomyError(f"{at_sub}: keys {sorted(defaults)} mean nothing in an "
                                        "open world; give only 'items'")
                bad = set(defaults) - set(SHAPE_KEYS)
                if bad:
                    raise TaxonomyError(f"{at_sub}: unknown keys {sorted(bad)}; allowed: items, "
                                        f"{', '.join(SHAPE_KEYS)}")
            if not body:
                raise TaxonomyError(f"{at_sub} has no items; add items or remove it")
            if not isinstance(body, list):
                raise TaxonomyError(f"{at_sub}: items must be a list; got {body!r}")
            seen: set[str] = set()
            for raw in body:
                if world == "shapes":
                    name, data = _shape_item(raw, defaults, at_sub)
                else:
                    name, data = _name(raw, f"{at_sub} item"), {}
                if name in seen:
                    raise TaxonomyError(f"{at_sub}: item {name!r} is listed twice; ids must be "
                                        "unique")
                seen.add(name)
                items.append(Item(cat, sub, name, data))
    return Taxonomy(Path(source).stem, world, path, tuple(items))


def load_taxonomy(name_or_path: str | Path) -> Taxonomy:
    """Load and validate ``configs/taxonomy/NAME.yaml`` or a path."""
    path = resolve(name_or_path)
    source = path.stem if path.parent == CONFIG_DIR / "taxonomy" else str(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TaxonomyError(f"taxonomy {source}: {path} is not valid YAML: {exc}") from None
    return parse(tree, source, path)
