"""The RL prompt set: taxonomies, the grammar and openai backends, Parquet, and the stage."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import mlflow
from lens import cli
from lens_model.data.captions import prompt_set, satisfies
from lens_model.data.world import COLORS, Obj, Scene, place, render
from lens_model.recipe import load_recipe
from lens_model.rl.judge import answer
from lens_model.rl.llm import LLMError
from lens_model.rl.prompts import RLPrompt, build_prompts, read_prompts, write_prompts
from lens_model.rl.rubrics import check_rubrics
from lens_model.rl.taxonomy import DIMENSIONS, TaxonomyError, load_taxonomy
from tasks.results import PromptSet
from tests.fake_openai import FakeOpenAI

TINY = ["rl.num_prompts=256"]


@pytest.fixture(scope="module")
def tiny_prompts() -> list[RLPrompt]:
    return build_prompts(load_recipe("tiny", TINY))


# ---------------------------------------------------------------- taxonomies


def test_shipped_taxonomies_load() -> None:
    shapes, lens = load_taxonomy("shapes"), load_taxonomy("lens")
    assert shapes.world == "shapes" and lens.world == "open"
    assert {i.category for i in shapes.items} == {"objects", "counts", "spatial relations",
                                                  "attribute binding", "scene-level"}
    assert len({i.category for i in lens.items}) == 10
    for tax in (shapes, lens):
        ids = [i.id for i in tax.items]
        assert len(ids) == len(set(ids)) and all(i.count("/") == 2 for i in ids)
    item = next(i for i in shapes.items if i.id == "counts/pairs/two circles")
    assert item.data["counts"] == [2] and item.data["require"] == ["count"]


@pytest.mark.parametrize("text, message", [
    ("world: shapes\ncategories:\n  counts:\n    pairs: []\n",
     "bad.yaml: category 'counts' sub-category 'pairs' has no items; add items or remove it"),
    ("world: shapes\ncategories:\n  counts:\n    pairs:\n      counts: [2]\n",
     "category 'counts' sub-category 'pairs' has no items"),
    ("world: open\ncategories:\n  animal: {}\n", "category 'animal' has no sub-categories"),
    ("world: shapes\ncategories:\n  objects:\n    round:\n      - {name: x, shapes: [hexagon]}\n",
     "sub-category 'round' item 'x': shapes entry 'hexagon' is not in the shapes world"),
    ("world: shapes\ncategories:\n  objects:\n    round:\n      - {name: x, colors: [white]}\n",
     "item 'x': colors entry 'white'"),
    ("world: shapes\ncategories:\n  o:\n    r:\n      - {name: x, counts: [5]}\n",
     "counts entry 5 is not in the shapes world; use whole numbers 2 to 4"),
    ("world: shapes\ncategories:\n  o:\n    r:\n      - {name: x, shade: [1]}\n",
     "item 'x': unknown key 'shade'"),
    ("world: shapes\ncategories:\n  o:\n    r:\n      - {name: x, dimensions: [count], "
     "require: [colour]}\n", "require ['colour'] is not among its dimensions"),
    ("world: open\ncategories:\n  animal:\n    pets: [cat, cat]\n",
     "sub-category 'pets': item 'cat' is listed twice"),
    ("world: open\ncategories:\n  a/b:\n    pets: [cat]\n", "without '/'"),
    ("world: flat\ncategories: {a: {b: [c]}}\n", "world 'flat' is unknown"),
    ("categories: [1, 2]\n", "needs a mapping with 'world'"),
    ("world: open\ncategories:\n  a: {b: [c]\n", "is not valid YAML"),
])
def test_taxonomy_errors_name_the_branch(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TaxonomyError) as err:
        load_taxonomy(path)
    assert message in str(err.value)


def test_unknown_taxonomy_lists_known_ones() -> None:
    with pytest.raises(TaxonomyError, match="unknown taxonomy 'nope'; known: lens, shapes"):
        load_taxonomy("nope")


# ---------------------------------------------------------------- grammar backend


def test_grammar_set_is_deterministic_distinct_and_bounded(tiny_prompts) -> None:
    again = build_prompts(load_recipe("tiny", TINY))
    assert again == tiny_prompts and len(tiny_prompts) == 256
    assert len({p.text for p in tiny_prompts}) == 256
    assert len({p.prompt_id for p in tiny_prompts}) == 256
    other = build_prompts(load_recipe("tiny", [*TINY, "seed=1"]))
    assert {p.text for p in other} != {p.text for p in tiny_prompts}
    for p in tiny_prompts:
        assert p.text.startswith("a photo of ") and p.spec is not None
        assert 1 <= len(p.dimensions) <= 4 and set(p.dimensions) <= set(DIMENSIONS)
        assert p.item.startswith(f"{p.category}/{p.subcategory}/")
        check_rubrics(p.rubrics, p.prompt_id)
    assert {d for p in tiny_prompts for d in p.dimensions} == set(DIMENSIONS)
    assert {len(p.dimensions) for p in tiny_prompts} == {1, 2, 3, 4}


def test_dimension_bounds_follow_the_recipe() -> None:
    prompts = build_prompts(load_recipe("tiny", ["rl.num_prompts=64", "rl.min_dimensions=2",
                                                 "rl.max_dimensions=3"]))
    assert {len(p.dimensions) for p in prompts} == {2, 3}
    with pytest.raises(TaxonomyError, match=r"item '.+' describes 2 to \d dimensions, outside "
                       r"rl.min_dimensions..rl.max_dimensions = 1..1; widen"):
        build_prompts(load_recipe("tiny", ["rl.max_dimensions=1"]))


def _holds(check: dict, scene: Scene) -> bool:
    """A shapes check answered on a ground-truth scene by the judge's own rules."""
    return answer(check, scene.objects)


def ground_truth(p: RLPrompt, rng: random.Random) -> Scene:
    """A scene meeting the spec: named colours and sizes, the rest drawn at random."""
    sizes = {c["shape"]: c["size"] for c in p.rubrics.values() if c["kind"] == "size"}
    specs = [(o["shape"], o["color"] or rng.choice(list(COLORS)), sizes.get(o["shape"], "small"))
             for o in p.spec["objects"] for _ in range(o["count"])]

    def scene(placed: list[Obj]) -> Scene:
        return Scene(tuple(Obj(s, c, z, o.x, o.y) for (s, c, z), o in zip(specs, placed,
                                                                            strict=True)),
                     "light grey", "plain")

    centres = place(rng, [z for _, _, z in specs], tries=400,
                    accept=lambda placed: satisfies(p.spec, scene(placed)))
    assert centres is not None, f"{p.prompt_id}: no scene fits {p.text!r}"
    return scene([Obj("square", "red", z, x, y) for (_, _, z), (x, y) in zip(specs, centres,
                                                                            strict=True)])


def test_every_prompt_has_a_true_scene_and_its_rubrics_hold(tiny_prompts) -> None:
    rng = random.Random(0)
    for p in tiny_prompts:
        scene = ground_truth(p, rng)
        assert satisfies(p.spec, scene)
        failed = [name for name, check in p.rubrics.items() if not _holds(check, scene)]
        assert not failed, f"{p.prompt_id} {p.text!r}: rubrics {failed} fail on its own scene"
        for o in p.spec["objects"]:  # the text names what the spec asks for
            assert o["shape"] in p.text or o["shape"] + "es" in p.text
            assert o["color"] is None or o["color"] in p.text
        # the total rubric catches a stray object the prompt never named
        stray = Scene(scene.objects + (Obj("circle", "black", "small", 0.5, 0.5),),
                      scene.background, scene.pattern)
        assert not _holds(p.rubrics["total"], stray)
    render(scene, 32, 32)  # the last scene draws


def test_train_and_gold_split_by_item(tiny_prompts) -> None:
    split_of = {}
    for p in tiny_prompts:
        assert split_of.setdefault(p.item, p.split) == p.split, f"{p.item} is in both splits"
    gold = [i for i, s in split_of.items() if s == "gold"]
    assert 0.08 <= len(gold) / len(split_of) <= 0.35
    few = build_prompts(load_recipe("tiny", ["rl.num_prompts=2"]))
    assert {p.split for p in few} == {"train", "gold"}


def test_exclude_keeps_evaluation_prompts_out() -> None:
    recipe = load_recipe("tiny", TINY)
    evaluation = {p.text for p in prompt_set(recipe.eval.prompts_per_category,
                                             recipe.eval.prompt_seed)}
    plain = {p.text for p in build_prompts(recipe)}
    assert plain & evaluation, "nothing to exclude: the test proves nothing"
    kept = build_prompts(recipe, exclude=evaluation)
    assert len(kept) == 256 and not {p.text for p in kept} & evaluation


def test_too_small_a_taxonomy_says_so(tmp_path: Path) -> None:
    path = tmp_path / "one.yaml"
    path.write_text("world: shapes\ncategories:\n  o:\n    r:\n      - name: red circle\n"
                    "        shapes: [circle]\n        colors: [red]\n"
                    "        dimensions: [colour]\n")
    with pytest.raises(TaxonomyError, match="yields only 1 distinct prompts"):
        build_prompts(load_recipe("tiny", [f"rl.taxonomy={path}", "rl.num_prompts=5"]))
    with pytest.raises(TaxonomyError, match="grammar backend writes shapes-world prompts only"):
        build_prompts(load_recipe("tiny", ["rl.taxonomy=lens"]))


def test_parquet_round_trip_and_bad_files(tmp_path: Path, tiny_prompts) -> None:
    path = write_prompts(tiny_prompts, tmp_path / "p.parquet")
    assert read_prompts(path) == tiny_prompts
    table = pq.read_table(path)
    assert table.schema.field("rubrics").type == "string"
    with pytest.raises(FileNotFoundError, match="lens rl prompts"):
        read_prompts(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        read_prompts(tmp_path / "junk.parquet")
    pq.write_table(table.drop_columns(["spec"]), tmp_path / "old.parquet")
    with pytest.raises(ValueError, match=r"lacks columns \['spec'\]"):
        read_prompts(tmp_path / "old.parquet")
    rows = table.to_pylist()
    rows[3]["rubrics"] = "{broken"
    pq.write_table(table.from_pylist(rows, schema=table.schema), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=f"row {tiny_prompts[3].prompt_id!r}: a JSON column"):
        read_prompts(tmp_path / "bad.parquet")
    rows[3]["rubrics"] = json.dumps({"x": {"kind": "count", "shape": "hexagon", "count": 1}})
    pq.write_table(table.from_pylist(rows, schema=table.schema), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="shape 'hexagon' is not in the shapes world"):
        read_prompts(tmp_path / "bad.parquet")


# ---------------------------------------------------------------- openai backend


def _writer(req: dict) -> str:
    ask = req["messages"][-1]["content"]
    item = ask.split("Item: ", 1)[1].split(" (", 1)[0]
    variant = ask.split("(variation ", 1)[1].split(")", 1)[0]
    words = " ".join(["vivid"] * 30)
    return "```json\n" + json.dumps({"prompt": f"A {item} number {variant}, {words}.",
                                     "rubrics": {"subject": f"Is there a {item}?",
                                                 "style": "Is it a photo?"}}) + "\n```"


def test_openai_backend_writes_question_rubrics(monkeypatch) -> None:
    with FakeOpenAI(_writer) as api:
        recipe = load_recipe("tiny", ["rl.taxonomy=lens", "rl.prompt_backend=openai",
                                      "rl.num_prompts=12", f"rl.endpoint.base_url={api.base_url}",
                                      "rl.endpoint.model=writer"])
        prompts = build_prompts(recipe)
    assert len(prompts) == 12 and len({p.text for p in prompts}) == 12
    assert {p.split for p in prompts} == {"train", "gold"}
    for p in prompts:
        assert p.spec is None and 30 <= len(p.text.split()) <= 60
        item = p.item.rsplit("/", 1)[1]
        assert p.rubrics["subject"] == {"kind": "question", "text": f"Is there a {item}?"}
        check_rubrics(p.rubrics, p.prompt_id)
    asks = [r["messages"][-1]["content"] for r in api.requests]
    assert all("Describe these dimensions: " in a for a in asks)
    assert api.requests[0]["model"] == "writer"


def test_openai_backend_fails_clearly_after_bounded_retries() -> None:
    def short(req: dict) -> str:
        return json.dumps({"prompt": "too short", "rubrics": {"a": "Is it?"}})

    with FakeOpenAI(short) as api:
        recipe = load_recipe("tiny", ["rl.taxonomy=lens", "rl.prompt_backend=openai",
                                      "rl.num_prompts=4", f"rl.endpoint.base_url={api.base_url}",
                                      "rl.endpoint.model=writer", "rl.endpoint.max_retries=1"])
        with pytest.raises(LLMError) as err:
            build_prompts(recipe)
    msg = str(err.value)
    assert "RL prompt for item '" in msg and "after 2 tries" in msg
    assert "the prompt has 2 words; it must have 30 to 60" in msg


# ---------------------------------------------------------------- the stage


def test_stage_builds_checks_versions_and_tracks(prefect_server, dvc_repo: Path) -> None:
    from prefect import flow

    from tasks.rl_prompts import OUT, outputs_current, rl_prompts_task

    repo = dvc_repo
    recipe = load_recipe("tiny", TINY)

    @flow
    def twice() -> tuple[PromptSet, PromptSet, str]:
        first = rl_prompts_task(recipe, str(repo))
        state = rl_prompts_task(recipe, str(repo), "another-parent", return_state=True)
        return first, state.result(), state.name

    first, second, name = twice()
    assert name == "Cached" and second == first  # the parent run id is not in the key
    assert first.counts["total"] == 256 and first.compute_s < 30
    assert first.counts["train"] + first.counts["gold"] == 256
    assert Path(first.path) == repo / OUT / "prompts.parquet"
    assert len(read_prompts(first.path)) == 256
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["rl_prompts"]
    assert lock["outs"][0]["md5"].removesuffix(".dir") == first.dvc_hash
    report = json.loads((repo / OUT / "contract.json").read_text())
    assert report["passed"] and len(report["expectations"]) == 6

    run = mlflow.MlflowClient().get_run(first.run_id)
    assert run.info.run_name == "rl-prompts-tiny"
    assert run.data.tags["lens.stage"] == "rl_prompts"
    assert run.data.tags["lens.dvc_hash"] == first.dvc_hash
    assert run.data.metrics["prompts.gold"] == first.counts["gold"]
    assert run.data.params["rl.taxonomy"] == "shapes"
    assert run.inputs.dataset_inputs[0].dataset.digest == first.dvc_hash[:36]

    # what a flow checks before trusting a cache hit
    assert outputs_current(recipe, repo)
    assert not outputs_current(load_recipe("tiny", [*TINY, "seed=3"]),
                               repo)
    Path(first.path).unlink()
    assert not outputs_current(recipe, repo)


def test_contract_failure_names_expectation_and_rows(prefect_server, dvc_repo: Path,
                                                     monkeypatch) -> None:
    from prefect import flow

    from tasks import rl_prompts

    repo = dvc_repo
    real = rl_prompts.build_prompts

    def broken(recipe, exclude=frozenset(), writer=None):
        good = real(recipe, exclude)
        first = good[0]
        twin = RLPrompt(first.prompt_id + "-twin", "gold" if first.split == "train" else "train",
                        first.category, first.subcategory, first.item, first.text,
                        first.dimensions, first.rubrics, first.spec)
        return [*good, twin]

    monkeypatch.setattr(rl_prompts, "build_prompts", broken)
    recipe = load_recipe("tiny", [*TINY, "rl.gold_frac=0.3"])
    @flow
    def once() -> PromptSet:
        return rl_prompts.rl_prompts_task(recipe, str(repo))

    with pytest.raises(rl_prompts.PromptContractFailed) as err:
        once()
    msg = str(err.value)
    assert "expect_column_values_to_be_unique on text: 2 rows" in msg
    assert "expect_column_values_to_be_in_set on shared_item" in msg
    assert "-twin" in msg
    lock = repo / "dvc.lock"
    assert not lock.exists() or "rl_prompts" not in yaml.safe_load(lock.read_text())["stages"]


def test_log_prompt_input_needs_an_active_run(tmp_path: Path) -> None:
    from tasks.rl_prompts import log_prompt_input

    with pytest.raises(RuntimeError, match="needs an active MLflow run"):
        log_prompt_input(tmp_path / "p.parquet", "abc", "x")


def test_cli_writes_the_stage_output(tmp_path: Path, capsys) -> None:
    code = cli.main(["rl", "prompts", "tiny", "--set", "rl.num_prompts=64", "--out",
                     str(tmp_path / "out"), "--json"])
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["counts"]["total"] == 64 and Path(last["path"]).is_file()
