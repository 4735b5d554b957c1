"""Gated promotion on a real MLflow registry (SQLite): failing and passing gates, regression
against the champion, rollback, two promotions racing, and the CLI's exit codes."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

import mlflow
from lens import cli
from lens_model.recipe import GatesSection
from tasks import promote
from tasks.registry import CANDIDATE, CHAMPION

GATES = GatesSection(min_overall=0.3, max_regression=0.05, max_latency_s=1.0)
CATS = ("single_object", "colors", "overall")


def _model() -> str:
    name = f"lens-test-{uuid.uuid4().hex[:8]}"
    mlflow.MlflowClient().create_registered_model(name)
    return name


def _version(name: str, score: float, latency: float = 0.1, eval_hash: str = "e1",
             cats: tuple[str, ...] = CATS, **per_cat: float) -> str:
    """A registered version carrying what the register stage records: gates and scores."""
    client = mlflow.MlflowClient()
    mv = client.create_model_version(name, source="file:///nowhere")
    tags = {"lens.gates": GATES.model_dump_json(), "eval.seconds_per_image": str(latency),
            "lens.eval_hash": eval_hash}
    tags |= {f"eval.{c}": str(per_cat.get(c, score)) for c in cats}
    for k, v in tags.items():
        client.set_model_version_tag(name, mv.version, k, v)
    client.set_registered_model_alias(name, CANDIDATE, mv.version)
    return str(mv.version)


def _aliases(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in mlflow.MlflowClient().get_registered_model(name).aliases.items()}


def test_failing_gate_moves_nothing_and_names_the_gate_and_margin(capsys) -> None:
    name = _model()
    v1 = _version(name, 0.2, latency=1.5)
    before = _aliases(name)
    with pytest.raises(promote.PromotionError, match=r"overall 0.200 is 0.100 under the minimum"
                                                     r".*latency 1.500 s/image is 0.500 s over"):
        promote.promote(name, v1)
    assert _aliases(name) == before == {CANDIDATE: v1}
    assert cli.main(["promote", name, v1]) == 1
    out = capsys.readouterr().out
    assert "FAIL min_overall" in out and "FAIL max_latency_s" in out


def test_passing_gate_moves_champion_and_records_who_when_why(monkeypatch) -> None:
    monkeypatch.setenv("LENS_USER", "release-manager")
    name = _model()
    v1 = _version(name, 0.5)
    assert cli.main(["promote", name, v1, "--dry-run"]) == 0
    assert CHAMPION not in _aliases(name)  # a dry run moves nothing
    promote.promote(name, v1, reason="first release")
    assert _aliases(name)[CHAMPION] == v1
    tags = mlflow.MlflowClient().get_model_version(name, v1).tags
    assert tags["lens.promoted_by"] == "release-manager"
    assert tags["lens.promotion_reason"] == "first release" and tags["lens.promoted_at"]
    assert json.loads(tags["lens.gate_results"])["passed"] is True


def test_regression_against_champion_fails_then_rollback_restores_it(capsys) -> None:
    name = _model()
    v1 = _version(name, 0.6)
    promote.promote(name, v1)
    v2 = _version(name, 0.6, colors=0.5)  # colours drop 0.1 > 0.05
    report = promote.check_gates(name, v2)
    failed = [c for c in report.checks if not c.passed]
    assert [c.gate for c in failed] == ["max_regression:colors"]
    assert "over the allowed 0.050 by 0.050" in failed[0].detail
    with pytest.raises(promote.PromotionError, match="colors dropped 0.100"):
        promote.promote(name, v2)
    assert _aliases(name)[CHAMPION] == v1
    v3 = _version(name, 0.7)
    assert cli.main(["promote", name, v3]) == 0
    assert _aliases(name)[CHAMPION] == v3
    assert cli.main(["promote", name, "--rollback", "--reason", "bad outputs"]) == 0
    assert _aliases(name)[CHAMPION] == v1
    assert "moved back from v3 to v1" in capsys.readouterr().out.replace(f"v{v3}", "v3")
    assert json.loads(mlflow.MlflowClient().get_model_version(name, v3).tags[
        "lens.rolled_back"])["to"] == v1
    with pytest.raises(promote.PromotionError, match="nothing to roll back"):
        promote.rollback(name)  # v1 replaced no earlier champion


def test_regression_needs_the_champions_protocol_and_categories() -> None:
    name = _model()
    promote.promote(name, _version(name, 0.6))
    other = promote.check_gates(name, _version(name, 0.7, eval_hash="e2"))
    assert [c.gate for c in other.checks if not c.passed] == ["same_eval_protocol"]
    assert "under eval protocol e2 but champion" in other.failures()
    partial = promote.check_gates(name, _version(name, 0.7, cats=("single_object", "overall")))
    assert [c.gate for c in partial.checks if not c.passed] == ["max_regression:missing"]
    assert "has no score for colors" in partial.failures()


def test_two_racing_promotions_exactly_one_wins() -> None:
    name = _model()
    v1 = _version(name, 0.5)
    promote.promote(name, v1)
    v2, v3 = _version(name, 0.6), _version(name, 0.7)
    outcome: dict[str, str] = {}

    def attempt(version: str) -> None:
        try:
            promote.promote(name, version)
            outcome[version] = "won"
        except promote.PromotionError as exc:
            outcome[version] = str(exc)

    # Hold the registry lock so both gate against v1 and then wait to commit.
    with promote.registry_lock():
        threads = [threading.Thread(target=attempt, args=(v,)) for v in (v2, v3)]
        for t in threads:
            t.start()
        time.sleep(3)
        assert outcome == {}  # neither committed while the lock was held
    for t in threads:
        t.join(timeout=60)
    winners = [v for v, r in outcome.items() if r == "won"]
    assert len(winners) == 1, outcome
    loser = ({v2, v3} - set(winners)).pop()
    assert "champion moved from" in outcome[loser]
    assert _aliases(name)[CHAMPION] == winners[0]
    tags = mlflow.MlflowClient().get_model_version(name, loser).tags
    assert "lens.promoted_by" not in tags  # the loser left no half-done promotion behind


def test_unknown_version_and_missing_version_are_clear(capsys) -> None:
    name = _model()
    assert cli.main(["promote", name, "9"]) == 1
    assert "has no version '9'" in capsys.readouterr().err
    assert cli.main(["promote", name]) == 2


def test_promotions_through_a_tracking_server_lock_on_postgresql(monkeypatch) -> None:
    """Behind an http tracking URI the lock is a PostgreSQL advisory lock when
    LENS_REGISTRY_LOCK_URL names a database, so promotions on other hosts wait for it."""
    import psycopg2

    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://mlflow.example:5000")
    monkeypatch.setenv("LENS_REGISTRY_LOCK_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    query = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s"
    with psycopg2.connect("postgresql://postgres@127.0.0.1:5432/postgres") as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            with promote.registry_lock():
                cur.execute(query, (promote.LOCK_KEY,))
                assert cur.fetchone()[0] == 1
            cur.execute(query, (promote.LOCK_KEY,))
            assert cur.fetchone()[0] == 0
    monkeypatch.delenv("LENS_REGISTRY_LOCK_URL")
    with pytest.warns(UserWarning, match="LENS_REGISTRY_LOCK_URL"), promote.registry_lock():
        pass  # without it: this host only, and said so
