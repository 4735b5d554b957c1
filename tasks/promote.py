"""Gated promotion and rollback of registered model versions through MLflow aliases.

A candidate takes ``champion`` only if it passes the gates its registration recorded (from
its recipe): a minimum overall score, a maximum drop in any category against the current
champion, a maximum latency and, for a distilled model, a minimum share of its teacher's
score. Promotion is compare-and-set: the champion it was gated against must still be the
champion when it commits, checked under a registry-wide lock, so of two racing promotions
exactly one wins. The alias moves last, in one call, after the version has been tagged with
who promoted it, when, why, the gate results and the champion it replaced; rollback follows
that ``lens.previous_champion`` tag back.
"""

from __future__ import annotations

import getpass
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

import mlflow
from lens_model import defaults
from lens_model.atomic import file_lock
from lens_model.recipe import GatesSection
from tasks.registry import CHAMPION

LOCK_KEY = 0x4C454E53  # pg_advisory_lock key: "LENS"
LOCK_WAIT_MS = 300_000  # a promotion waits at most 5 minutes for another one


class PromotionError(RuntimeError):
    """A promotion or rollback that must not happen (gates failed, nothing to roll back)."""


@dataclass
class Check:
    gate: str
    passed: bool
    value: float
    limit: float
    detail: str


@dataclass
class GateReport:
    name: str
    version: str
    champion: str | None
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> str:
        return "; ".join(c.detail for c in self.checks if not c.passed)

    def raise_if_failed(self) -> None:
        """Raise :class:`PromotionError` naming every failed gate, if any failed."""
        if not self.passed:
            raise PromotionError(f"{self.name} v{self.version} fails its gates: "
                                 f"{self.failures()}")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "champion": self.champion,
                "passed": self.passed, "checks": [asdict(c) for c in self.checks]}


def _scores(tags: dict[str, str]) -> dict[str, float]:
    return {k.removeprefix("eval."): float(v) for k, v in tags.items()
            if k.startswith("eval.") and k != "eval.seconds_per_image"}


def _version(client: mlflow.MlflowClient, name: str, version: str) -> Any:
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise PromotionError(f"model {name!r} has no version {version!r} ({exc}); list versions "
                             f"with `mlflow models` or the registry UI") from exc


def champion_version(client: mlflow.MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def check_gates(name: str, version: str) -> GateReport:
    """The candidate's gate results against the current champion (none: regression passes)."""
    client = mlflow.MlflowClient()
    cand = _version(client, name, version)
    if "lens.gates" not in cand.tags:
        raise PromotionError(f"{name} version {version} carries no lens.gates tag: it was not "
                             f"registered by the Lens pipeline, so it has no gates to pass")
    gates = GatesSection.model_validate_json(cand.tags["lens.gates"])
    scores = _scores(cand.tags)
    latency = float(cand.tags.get("eval.seconds_per_image", "inf"))
    overall = scores.get("overall", 0.0)
    checks = [
        Check("min_overall", overall >= gates.min_overall, overall, gates.min_overall,
              f"overall {overall:.3f} is {gates.min_overall - overall:.3f} under the minimum "
              f"{gates.min_overall:.3f}"),
        Check("max_latency_s", latency <= gates.max_latency_s, latency, gates.max_latency_s,
              f"latency {latency:.3f} s/image is {latency - gates.max_latency_s:.3f} s over "
              f"the maximum {gates.max_latency_s:.3f}")]
    if "lens.teacher_overall" in cand.tags:  # a distilled model keeps most of its teacher
        teacher = float(cand.tags["lens.teacher_overall"])
        floor = gates.min_teacher_share * teacher
        checks.append(Check("min_teacher_share", overall >= floor - 1e-9, overall, floor,
                            f"overall {overall:.3f} is under {gates.min_teacher_share:.0%} of "
                            f"its teacher's {teacher:.3f} ({floor:.3f})"))
    champ = champion_version(client, name)
    if champ is not None and champ != str(version):
        champ_tags = _version(client, name, champ).tags
        base = _scores(champ_tags)
        ours, theirs = cand.tags.get("lens.eval_hash", ""), champ_tags.get("lens.eval_hash", "")
        if ours != theirs:  # scores under different prompts or settings do not compare
            checks.append(Check("same_eval_protocol", False, 0.0, 0.0,
                                f"v{version} was scored under eval protocol {ours or '(none)'} "
                                f"but champion v{champ} under {theirs or '(none)'}; score both "
                                f"under one protocol before gating regressions"))
        missing = sorted(set(base) - set(scores))
        if missing:
            checks.append(Check("max_regression:missing", False, float(len(missing)), 0.0,
                                f"v{version} has no score for {', '.join(missing)}, which "
                                f"champion v{champ} has; evaluate it on every category"))
        for cat in sorted(set(base) & set(scores) - {"overall"}):
            drop = base[cat] - scores[cat]
            checks.append(Check(f"max_regression:{cat}", drop <= gates.max_regression + 1e-9,
                                drop, gates.max_regression,
                                f"{cat} dropped {drop:.3f} vs champion v{champ} ({base[cat]:.3f} "
                                f"-> {scores[cat]:.3f}), over the allowed "
                                f"{gates.max_regression:.3f} by {drop - gates.max_regression:.3f}"))
    return GateReport(name, str(version), champ, checks)


@contextmanager
def registry_lock() -> Iterator[None]:
    """One promotion at a time per registry: a PostgreSQL advisory lock when the registry is
    on PostgreSQL (directly, or behind a tracking server with ``LENS_REGISTRY_LOCK_URL``
    naming its database), else an exclusive file lock beside the SQLite store or under
    LENS_HOME, which serialises promotions on this host only."""
    uri = mlflow.get_tracking_uri()
    lock_url = uri if uri.startswith("postgresql") else os.environ.get("LENS_REGISTRY_LOCK_URL", "")
    if lock_url:
        import sqlalchemy

        # SQLAlchemy 2 maps a bare postgresql:// to psycopg 3; this project ships psycopg2.
        if lock_url.startswith("postgresql://"):
            lock_url = "postgresql+psycopg2://" + lock_url.removeprefix("postgresql://")
        # A session lock dies with its connection, so closing the connection releases it
        # even when the body raised; the timeout bounds the wait behind a stuck promotion.
        engine = sqlalchemy.create_engine(lock_url)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text(f"SET statement_timeout = {LOCK_WAIT_MS}"))
                conn.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({LOCK_KEY})"))
                conn.execute(sqlalchemy.text("SET statement_timeout = 0"))
                yield
        finally:
            engine.dispose()
        return
    if uri.startswith(("http://", "https://")):
        warnings.warn(f"promotions through {uri} are serialised on this host only; set "
                      "LENS_REGISTRY_LOCK_URL to the tracking server's PostgreSQL database "
                      "to serialise them across hosts", stacklevel=3)
    path = (Path(uri.removeprefix("sqlite:///")).with_suffix(".registry.lock")
            if uri.startswith("sqlite:///") else defaults.lens_home() / "registry.lock")
    with file_lock(path):
        yield


def _who() -> str:
    return os.environ.get("LENS_USER") or getpass.getuser()


def promote(name: str, version: str, dry_run: bool = False, reason: str = "") -> GateReport:
    """Gate ``version`` and, unless ``dry_run``, move ``champion`` to it. Raises
    :class:`PromotionError` naming the failed gates (aliases untouched) or a lost race."""
    report = check_gates(name, version)
    if not dry_run:
        commit(report, reason)
    return report


def commit(report: GateReport, reason: str = "") -> None:
    """Move ``champion`` to the gated version, if it passed and the champion it was gated
    against is still the champion (checked under the registry lock)."""
    name, version = report.name, report.version
    report.raise_if_failed()
    client = mlflow.MlflowClient()
    with registry_lock():
        now = champion_version(client, name)
        if now != report.champion:
            raise PromotionError(f"champion moved from v{report.champion} to v{now} while "
                                 f"{name} v{version} was being gated; gate it again")
        if now == str(version):
            return
        stamp = {"lens.promoted_by": _who(),
                 "lens.promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
                 "lens.promotion_reason": reason or "passed its gates",
                 "lens.gate_results": json.dumps(report.to_json()),
                 "lens.previous_champion": now or ""}
        for key, value in stamp.items():
            client.set_model_version_tag(name, str(version), key, value)
        client.set_registered_model_alias(name, CHAMPION, str(version))


def rollback(name: str, reason: str = "") -> tuple[str, str]:
    """Move ``champion`` back to the champion it replaced; returns (from, to) versions."""
    client = mlflow.MlflowClient()
    with registry_lock():
        now = champion_version(client, name)
        if now is None:
            raise PromotionError(f"model {name!r} has no {CHAMPION} alias; nothing to roll back")
        previous = _version(client, name, now).tags.get("lens.previous_champion", "")
        if not previous:
            raise PromotionError(f"{name} v{now} replaced no earlier champion; there is "
                                 f"nothing to roll back to")
        _version(client, name, previous)  # it must still exist
        client.set_model_version_tag(name, now, "lens.rolled_back", json.dumps({
            "by": _who(), "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "to": previous, "reason": reason}))
        client.set_registered_model_alias(name, CHAMPION, previous)
    return now, previous
