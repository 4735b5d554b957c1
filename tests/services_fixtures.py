"""Real backing services for the team-services tests: fresh PostgreSQL databases, a
moto_server S3 with a bucket, and the MLflow/Prefect servers `lens services up` starts.

Import the fixtures into a test module (``from tests.services_fixtures import ...``); each
one cleans up after itself: databases dropped, servers' process groups stopped.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lens import services
from tests.conftest import free_port

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BIN = Path(sys.executable).parent


def _pg(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN_URL)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def pg_names() -> Iterator[dict[str, str]]:
    """Unique database names for LENS_MLFLOW_DB / _AUTH_DB / LENS_PREFECT_DB, dropped after
    (`lens services up` creates them)."""
    tag = f"lens_t_{secrets.token_hex(4)}"
    names = {"LENS_MLFLOW_DB": f"{tag}_mlflow", "LENS_MLFLOW_AUTH_DB": f"{tag}_auth",
             "LENS_PREFECT_DB": f"{tag}_prefect"}
    yield names
    drop_databases(tuple(names.values()))


def drop_databases(names: tuple[str, ...]) -> None:
    for name in names:
        _pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class S3:
    endpoint: str
    bucket: str
    env: dict[str, str]

    def client(self):  # noqa: ANN201 (boto3's client type is generated)
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(15)


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """moto_server on 127.0.0.1 at a free port, with an empty bucket made through boto3."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    moto = shutil.which("moto_server", path=str(BIN)) or "moto_server"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except (OSError, urllib.error.HTTPError):
                assert proc.poll() is None, f"moto_server exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"moto_server not up:\n{log.read_text()}"
                time.sleep(0.3)
        s3 = S3(endpoint, f"lens-{secrets.token_hex(4)}", {
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": endpoint,
            "AWS_ENDPOINT_URL": endpoint})
        s3.client().create_bucket(Bucket=s3.bucket)
        yield s3
    finally:
        _stop_group(proc)


@dataclass
class Stack:
    """Running team services and what a client needs to use them."""

    settings: services.ServiceSettings
    env: dict[str, str]         # the whole environment the servers were started from
    client_env: dict[str, str]  # what a pipeline process sets to use them
    password: str
    seconds: dict[str, float]   # start-up time of each service (db upgrade included)
    s3: S3

    def request(self, method: str, path: str, body: dict | None = None,
                auth: tuple[str, str] | None = None) -> int:
        """HTTP status of ``method path`` on the MLflow server."""
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = "Basic " + base64.b64encode(
                f"{auth[0]}:{auth[1]}".encode()).decode()
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.settings.mlflow_url + path, data=data,
                                     headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code


def stack_env(home: Path, names: dict[str, str], s3: S3) -> dict[str, str]:
    """The environment for `lens services up` on these databases and this S3."""
    return {
        **s3.env, **names,
        "LENS_HOME": str(home),
        "LENS_MLFLOW_PORT": str(free_port()), "LENS_PREFECT_PORT": str(free_port()),
        "LENS_MLFLOW_ARTIFACTS": f"s3://{s3.bucket}/mlflow",
        "LENS_MLFLOW_ADMIN_PASSWORD": secrets.token_urlsafe(18),
    }


def start_stack(home: Path, names: dict[str, str], s3: S3,
                which: tuple[str, ...] = services.SERVICES) -> Stack:
    env = stack_env(home, names, s3)
    with pytest.MonkeyPatch.context() as mp:  # from_env() and up() read os.environ
        for key, value in env.items():
            mp.setenv(key, value)
        settings = services.ServiceSettings.from_env()
        try:
            seconds = services.up(settings, which, timeout=240)
        except BaseException:  # one server up, the next failed: stop what did start
            services.down(settings)
            raise
        full_env = dict(os.environ)
    client = {"MLFLOW_TRACKING_URI": settings.mlflow_url,
              "MLFLOW_TRACKING_USERNAME": settings.admin_user,
              "MLFLOW_TRACKING_PASSWORD": env["LENS_MLFLOW_ADMIN_PASSWORD"]}
    if "prefect" in which:
        client["PREFECT_API_URL"] = settings.prefect_api_url
    return Stack(settings, full_env, client, env["LENS_MLFLOW_ADMIN_PASSWORD"], seconds, s3)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_names: dict[str, str],
          moto_s3: S3) -> Iterator[Stack]:
    """MLflow (PostgreSQL, S3 on moto, basic auth) and Prefect (PostgreSQL), as `lens
    services up` starts them; stopped after the module."""
    home = tmp_path_factory.mktemp("stack-home")
    running = start_stack(home, pg_names, moto_s3)
    try:
        yield running
    finally:
        services.down(running.settings)
