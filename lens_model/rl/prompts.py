"""The RL prompt set: prompts with their own rubrics, written from a taxonomy, split by item.

Each prompt describes 1 to 4 dimensions (``taxonomy.DIMENSIONS``) of one taxonomy item. The
``grammar`` backend writes shapes-world prompts in the GenEval wording the tiny model learned
("a photo of two large red circles left of a blue star"), with exact rubrics and the full
spec, and keeps only prompts whose scene can be laid out. The ``openai`` backend asks an
OpenAI-compatible endpoint for a 30-60 word prompt and yes/no rubric questions per item.

Items, not prompts, go to train or gold (a seeded hash against ``rl.gold_frac``), so the
gold set measures generalisation to unseen items. Everything is a function of the recipe's
seed: the same recipe gives the same set.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lens_model import atomic
from lens_model.data.captions import NUMBERS, _a, _join  # the captions' own grammar
from lens_model.data.world import PLURALS, SHAPES, Obj, place, relation
from lens_model.recipe import EndpointSection, Recipe
from lens_model.rl.llm import chat_json
from lens_model.rl.rubrics import INTEGRITY, MAX_RUBRICS, RubricError, check_rubrics
from lens_model.rl.taxonomy import DIMENSIONS, Item, Taxonomy, TaxonomyError, load_taxonomy

SPLITS = ("train", "gold")
MAX_FAILS = 60  # attempts in a row without a new prompt before an item counts as used up
WORDS = (30, 60)  # open-world prompt length in words, as Lens-RL-8K
SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("split", pa.string()), ("category", pa.string()),
    ("subcategory", pa.string()), ("item", pa.string()), ("text", pa.string()),
    ("dimensions", pa.string()), ("n_dimensions", pa.int64()), ("rubrics", pa.string()),
    ("n_rubrics", pa.int64()), ("spec", pa.string()),
], metadata={"lens.rl_prompts": "1"})

# (item, dimensions, rng) -> (text, rubrics, spec), or None when no prompt fits this draw
Writer = Callable[[Item, tuple[str, ...], random.Random],
                  "tuple[str, dict[str, dict], dict | None] | None"]


@dataclass(frozen=True)
class RLPrompt:
    prompt_id: str
    split: str  # "train" | "gold"
    category: str
    subcategory: str
    item: str  # the item's id, category/subcategory/name
    text: str
    dimensions: tuple[str, ...]
    rubrics: dict[str, dict]
    spec: dict | None  # shapes world: the whole scene asked for; None elsewhere


# ---------------------------------------------------------------- splits and dimensions


def split_of(item_id: str, seed: int, gold_frac: float) -> str:
    """``gold`` for a seeded-hash share ``gold_frac`` of items, else ``train``."""
    digest = hashlib.sha256(f"rl-split/{seed}/{item_id}".encode()).hexdigest()
    return "gold" if int(digest[:12], 16) / 16 ** 12 < gold_frac else "train"


def splits(items: Iterable[Item], seed: int, gold_frac: float) -> dict[str, str]:
    """``{item id: split}``; with two or more items, each split gets at least one."""
    ids = [it.id for it in items]
    out = {i: split_of(i, seed, gold_frac) for i in ids}
    rank = sorted(ids, key=lambda i: hashlib.sha256(f"rl-split/{seed}/{i}".encode()).digest())
    if len(ids) >= 2:
        for split, pick in (("gold", rank[0]), ("train", rank[-1])):
            if split not in out.values():
                out[pick] = split
    return out


def dimension_range(item: Item, rl_min: int, rl_max: int) -> tuple[int, int]:
    """How many dimensions the item's prompts describe; an error if the recipe's bounds and
    the item's own dimensions do not meet."""
    allowed = item.data.get("dimensions", DIMENSIONS)
    lo, hi = max(rl_min, len(item.data.get("require", []))), min(rl_max, len(allowed))
    if lo > hi:
        raise TaxonomyError(f"item {item.id!r} describes {len(item.data.get('require', []))} "
                            f"to {len(allowed)} dimensions, outside rl.min_dimensions.."
                            f"rl.max_dimensions = {rl_min}..{rl_max}; widen the item's "
                            "dimensions/require or the recipe's bounds")
    return lo, hi


def sample_dimensions(item: Item, rng: random.Random, lo: int, hi: int) -> tuple[str, ...]:
    """The item's required dimensions plus others it allows, ``lo..hi`` in all."""
    required = list(item.data.get("require", []))
    others = [d for d in item.data.get("dimensions", DIMENSIONS) if d not in required]
    chosen = set(required + rng.sample(others, rng.randint(lo, hi) - len(required)))
    return tuple(d for d in DIMENSIONS if d in chosen)


# ---------------------------------------------------------------- grammar (shapes world)


def _pick_new(rng: random.Random, preferred: list[str], used: set[str],
              fallback: Iterable[str]) -> str:
    """One of ``preferred`` not in ``used``; else any unused ``fallback``; else ``preferred``."""
    fresh = [v for v in preferred if v not in used] or [v for v in fallback if v not in used]
    return rng.choice(fresh or preferred)


def _phrase(group: dict[str, Any]) -> str:
    words = [w for w in (group["size"], group["named_color"]) if w]
    n = group["count"]
    words.append(PLURALS[group["shape"]] if n > 1 else group["shape"])
    return f"{NUMBERS[n]} {' '.join(words)}" if n > 1 else _a(" ".join(words))


def layout_sizes(rubrics: dict[str, dict], spec: dict[str, Any]) -> list[tuple[str, str]]:
    """(shape, size) per object the spec asks for: named sizes from the size rubrics, the
    rest small (what leaves most room)."""
    sized = {c["shape"]: c["size"] for c in rubrics.values() if c["kind"] == "size"}
    return [(o["shape"], sized.get(o["shape"], "small"))
            for o in spec["objects"] for _ in range(o["count"])]


def fits(spec: dict[str, Any], rubrics: dict[str, dict], rng: random.Random) -> bool:
    """Whether a scene with the spec's objects, named sizes and relation can be laid out."""
    objs = layout_sizes(rubrics, spec)
    if len(objs) > 4:
        return False
    rel = spec.get("relation")

    def accept(placed: list[Obj]) -> bool:
        if rel is None:
            return True
        a, b = (spec["objects"][rel[k]]["shape"] for k in ("a", "b"))
        return any(rel["type"] in relation(p, q) for p, (sa, _) in zip(placed, objs, strict=True)
                   if sa == a for q, (sb, _) in zip(placed, objs, strict=True) if sb == b)

    return place(rng, [size for _, size in objs], accept=accept) is not None


def grammar_prompt(item: Item, dims: tuple[str, ...],
                   rng: random.Random) -> tuple[str, dict[str, dict], dict] | None:
    """A GenEval-worded shapes prompt describing ``dims`` of ``item``, its exact rubrics and
    spec; None when this draw cannot be laid out (too many or too large objects)."""
    d = item.data
    named = "colour" in dims
    used_shapes: set[str] = set()
    used_colors: set[str] = set()
    used_sizes: set[str] = set()
    groups: list[dict[str, Any]] = []
    extras = ("spatial relation" in dims) + ("interaction" in dims)
    for i in range(1 + extras):
        shapes, colors = (d["shapes"], d["colors"]) if i == 0 else (d["partners"],
                                                                    d["partner_colors"])
        shape = _pick_new(rng, shapes, used_shapes, SHAPES)
        color = _pick_new(rng, colors, used_colors, ())
        size = None
        if "attribute" in dims and i < 2:  # the subject, and the one it is compared with
            size = _pick_new(rng, d["sizes"], used_sizes, ())
            used_sizes.add(size)
        count = rng.choice(d["counts"]) if i == 0 and "count" in dims else 1
        used_shapes.add(shape)
        used_colors.add(color)
        groups.append({"shape": shape, "named_color": color if named else None, "size": size,
                       "count": count})
    rel = rng.choice(d["relations"]) if "spatial relation" in dims else None
    phrases = [_phrase(g) for g in groups]
    if rel is not None:
        core = f"{phrases[0]} {rel} {phrases[1]}"
        text = "a photo of " + (f"{phrases[2]} and {core}" if len(phrases) == 3 else core)
    else:
        text = "a photo of " + _join(phrases)
    rubrics: dict[str, dict] = {}
    for g in groups:
        s = g["shape"]
        rubrics[f"{s}_count"] = {"kind": "count", "shape": s, "color": g["named_color"],
                                 "count": g["count"]}
        if g["named_color"]:
            rubrics[f"{s}_colour"] = {"kind": "color", "shape": s, "color": g["named_color"]}
        if g["size"]:
            rubrics[f"{s}_size"] = {"kind": "size", "shape": s, "size": g["size"]}
    if rel is not None:
        a, b = groups[0], groups[1]
        rubrics["placement"] = {"kind": "relation", "type": rel,
                                "a": {"shape": a["shape"], "color": a["named_color"]},
                                "b": {"shape": b["shape"], "color": b["named_color"]}}
    # the only check of stray objects of shapes the prompt never names
    rubrics["total"] = {"kind": "total", "count": sum(g["count"] for g in groups)}
    spec = {"objects": [{"shape": g["shape"], "color": g["named_color"], "count": g["count"]}
                        for g in groups],
            "relation": None if rel is None else {"a": 0, "type": rel, "b": 1}}
    if not fits(spec, rubrics, random.Random(rng.random())):
        return None
    return text, rubrics, spec


# ---------------------------------------------------------------- openai (any world)

WRITER_SYSTEM = (
    "You write prompts for training a text-to-image model with reinforcement learning. "
    "Each prompt depicts one given item and describes the requested dimensions concretely. "
    "Each rubric is a yes/no question a judge can answer from the image alone. Reply with "
    "one JSON object and nothing else.")


def _check_written(answer: dict[str, Any], prompt_id: str) -> tuple[str, dict[str, dict]]:
    """The LLM's {"prompt", "rubrics"} as (text, question rubrics); a ValueError says why not."""
    text, questions = answer.get("prompt"), answer.get("rubrics")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("'prompt' must be a non-empty string")
    words = len(text.split())
    if not WORDS[0] <= words <= WORDS[1]:
        raise ValueError(f"the prompt has {words} words; it must have {WORDS[0]} to {WORDS[1]}")
    if not isinstance(questions, dict) or not all(isinstance(q, str) and q.strip()
                                                  for q in questions.values()):
        raise ValueError("'rubrics' must map names to yes/no question strings")
    rubrics = {str(name): {"kind": "question", "text": q.strip()} for name, q in questions.items()}
    check_rubrics(rubrics, prompt_id)
    return " ".join(text.split()), rubrics


class OpenAIWriter:
    """Prompts and rubric questions from an OpenAI-compatible chat endpoint."""

    def __init__(self, endpoint: EndpointSection) -> None:
        self.endpoint = endpoint

    def messages(self, item: Item, dims: tuple[str, ...], variant: int) -> list[dict[str, str]]:
        ask = (f"Item: {item.name} (category {item.category}, sub-category {item.subcategory}).\n"
               f"Describe these dimensions: {', '.join(dims)}.\n"
               f"Write one image prompt of {WORDS[0]} to {WORDS[1]} words (variation "
               f"{variant}), and 1 to {MAX_RUBRICS} rubrics that check it.\n"
               'Answer as JSON: {"prompt": "...", "rubrics": {"short_name": "yes/no question?"}}'
               f'; do not name a rubric "{INTEGRITY}".')
        return [{"role": "system", "content": WRITER_SYSTEM}, {"role": "user", "content": ask}]

    def __call__(self, item: Item, dims: tuple[str, ...],
                 rng: random.Random) -> tuple[str, dict[str, dict], None]:
        variant = rng.randrange(10 ** 6)
        answer = chat_json(self.endpoint, self.messages(item, dims, variant),
                           f"RL prompt for item {item.id!r} ({', '.join(dims)})",
                           check=lambda a: {"ok": _check_written(a, item.id)},
                           temperature=1.0, seed=variant)
        text, rubrics = answer["ok"]
        return text, rubrics, None


# ---------------------------------------------------------------- the set


def _writer(recipe: Recipe, taxonomy: Taxonomy) -> tuple[Writer, int]:
    """The recipe's backend, and how many calls it runs at once."""
    if recipe.rl.prompt_backend == "grammar":
        if taxonomy.world != "shapes":
            raise TaxonomyError(f"taxonomy {taxonomy.name} is an {taxonomy.world} world; the "
                                "grammar backend writes shapes-world prompts only: set "
                                "rl.prompt_backend=openai (and rl.endpoint)")
        return grammar_prompt, 1
    return OpenAIWriter(recipe.rl.endpoint), 8


def build_prompts(recipe: Recipe, exclude: Iterable[str] = frozenset(),
                  writer: Writer | None = None) -> list[RLPrompt]:
    """``recipe.rl.num_prompts`` distinct prompts, cycling over the taxonomy's items (seeded
    order), none of whose texts is in ``exclude``; ``writer`` replaces the recipe's backend."""
    rl = recipe.rl
    taxonomy = load_taxonomy(rl.taxonomy)
    write, workers = (writer, 1) if writer is not None else _writer(recipe, taxonomy)
    split = splits(taxonomy.items, recipe.seed, rl.gold_frac)
    bounds = {it.id: dimension_range(it, rl.min_dimensions, rl.max_dimensions)
              for it in taxonomy.items}
    order = list(taxonomy.items)
    random.Random(f"rl-order/{recipe.seed}").shuffle(order)
    # a small set still gets both splits: the first gold and the first train item lead
    leads = [next(it for it in order if split[it.id] == s) for s in SPLITS
             if s in split.values()]
    order = leads + [it for it in order if it not in leads]
    active = {it.id for it in order}
    blocked = set(exclude)
    seen: set[str] = set()
    made = dict.fromkeys(split, 0)
    tries = dict.fromkeys(split, 0)
    fails = dict.fromkeys(split, 0)
    out: list[RLPrompt] = []
    cursor = 0
    while len(out) < rl.num_prompts and active:
        batch = []
        while len(batch) < workers:
            item = order[cursor % len(order)]
            cursor += 1
            if item.id not in active:
                continue
            tries[item.id] += 1
            rng = random.Random(f"rl-prompt/{recipe.seed}/{item.id}/{tries[item.id]}")
            batch.append((item, sample_dimensions(item, rng, *bounds[item.id]), rng))
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                results = list(pool.map(lambda job: write(*job), batch))
        else:
            results = [write(*job) for job in batch]
        for (item, dims, _), result in zip(batch, results, strict=True):
            if len(out) >= rl.num_prompts or item.id not in active:
                continue
            if result is None or result[0] in seen or result[0] in blocked:
                fails[item.id] += 1
                if fails[item.id] >= MAX_FAILS:  # this item has no new prompts left
                    active.discard(item.id)
                continue
            text, rubrics, spec = result
            fails[item.id] = 0
            seen.add(text)
            out.append(RLPrompt(f"{item.id}#{made[item.id]}", split[item.id], item.category,
                                item.subcategory, item.id, text, dims, rubrics, spec))
            made[item.id] += 1
    if len(out) < rl.num_prompts:
        raise TaxonomyError(f"taxonomy {taxonomy.name} yields only {len(out)} distinct prompts "
                            f"outside the evaluation set, not rl.num_prompts={rl.num_prompts}; "
                            "add items or lower rl.num_prompts")
    return out


def counts(prompts: list[RLPrompt]) -> dict[str, int]:
    """Prompts per split, per category and split, and items per split."""
    out: dict[str, int] = {"total": len(prompts)}
    for split in SPLITS:
        part = [p for p in prompts if p.split == split]
        out[split] = len(part)
        out[f"items.{split}"] = len({p.item for p in part})
        for p in part:
            key = f"{p.category}.{split}"
            out[key] = out.get(key, 0) + 1
    return out


# ---------------------------------------------------------------- Parquet


def to_rows(prompts: list[RLPrompt]) -> list[dict[str, Any]]:
    return [{"prompt_id": p.prompt_id, "split": p.split, "category": p.category,
             "subcategory": p.subcategory, "item": p.item, "text": p.text,
             "dimensions": json.dumps(list(p.dimensions)), "n_dimensions": len(p.dimensions),
             "rubrics": json.dumps(p.rubrics, sort_keys=True), "n_rubrics": len(p.rubrics),
             "spec": None if p.spec is None else json.dumps(p.spec, sort_keys=True)}
            for p in prompts]


def write_prompts(prompts: list[RLPrompt], path: str | Path) -> Path:
    """Write the set as Parquet (JSON in the dimensions, rubrics and spec columns), atomically."""
    table = pa.Table.from_pylist(to_rows(prompts), schema=SCHEMA)
    atomic.write_with(path, lambda tmp: pq.write_table(table, tmp))
    return Path(path)


def read_prompts(path: str | Path) -> list[RLPrompt]:
    """Read a set :func:`write_prompts` wrote; a bad file or row gets an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RL prompt set {path} does not exist; build it with "
                                "`lens rl prompts`")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"RL prompt set {path} is not a readable Parquet file: {exc}") from None
    missing = [n for n in SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"RL prompt set {path} lacks columns {missing}; rebuild it with "
                         "`lens rl prompts`")
    out = []
    for row in table.select(SCHEMA.names).to_pylist():
        where = f"RL prompt set {path} row {row['prompt_id']!r}"
        try:
            dims = tuple(json.loads(row["dimensions"]))
            rubrics = json.loads(row["rubrics"])
            spec = None if row["spec"] is None else json.loads(row["spec"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: a JSON column does not parse: {exc}") from None
        if row["split"] not in SPLITS or not isinstance(row["text"], str) or not row["text"]:
            raise ValueError(f"{where}: split must be one of {SPLITS} and text non-empty")
        bad = [d for d in dims if d not in DIMENSIONS]
        if bad:
            raise ValueError(f"{where}: unknown dimensions {bad}; use {', '.join(DIMENSIONS)}")
        try:
            check_rubrics(rubrics, row["prompt_id"])
        except RubricError as exc:
            raise ValueError(f"RL prompt set {path}: {exc}") from None
        out.append(RLPrompt(row["prompt_id"], row["split"], row["category"], row["subcategory"],
                            row["item"], row["text"], dims, rubrics, spec))
    return out

