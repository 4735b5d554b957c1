"""Team services (lens/services.py, `lens services`, mlflow/server.sh): settings from the
environment, refused admin passwords, the generated auth config, and (slow) the real MLflow
and Prefect servers on PostgreSQL + moto S3: auth, idempotent `up`, `down`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lens import cli, services

pytest_plugins = ["tests.services_fixtures"]  # pg_names, moto_s3, stack
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No service variable set; LENS_HOME in a temp folder."""
    for name in (*services.ENV_VARS, *services.SECRET_ENV_VARS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LENS_HOME", str(tmp_path / "home"))
    return monkeypatch


def test_settings_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = services.ServiceSettings.from_env()
    assert (s.host, s.mlflow_port, s.prefect_port, s.workers) == ("127.0.0.1", 5000, 4200, 1)
    assert s.mlflow_url == "http://127.0.0.1:5000"
    assert s.prefect_api_url == "http://127.0.0.1:4200/api"
    assert s.mlflow_backend_store_uri == "postgresql+psycopg2://postgres@127.0.0.1:5432/lens_mlflow"
    assert s.mlflow_auth_db_uri.endswith("/lens_mlflow_auth")
    assert s.prefect_database_url == "postgresql+asyncpg://postgres@127.0.0.1:5432/lens_prefect"
    assert s.artifacts_destination == "s3://lens-mlflow/artifacts" and s.bucket == "lens-mlflow"
    assert s.home == tmp_path / "home" / "services"
    assert "127.0.0.1:5000" in s.mlflow_allowed_hosts and "*" not in s.mlflow_allowed_hosts
    assert s.images["mlflow"] == s.images["prefect"] == "lens-platform:0.1.0"
    assert s == services.ServiceSettings(home=s.home)  # the dataclass defaults agree


def test_every_listed_variable_is_read(clean_env: pytest.MonkeyPatch) -> None:
    """ENV_VARS is what infra files are checked against: each one must change a setting."""
    base = services.ServiceSettings.from_env()
    values = {"LENS_HOME": "/srv/lens", "LENS_SERVICES_HOST": "10.0.0.5",
              "LENS_MLFLOW_PORT": "5100", "LENS_PREFECT_PORT": "4300",
              "LENS_POSTGRES_URL": "postgresql://lens@db:5433", "LENS_MLFLOW_DB": "m",
              "LENS_MLFLOW_AUTH_DB": "a", "LENS_PREFECT_DB": "p",
              "LENS_MLFLOW_ARTIFACTS": "s3://team/mlflow", "MLFLOW_S3_ENDPOINT_URL": "http://s3:9000",
              "AWS_ENDPOINT_URL": "http://s3:9001", "AWS_DEFAULT_REGION": "eu-west-1",
              "LENS_MLFLOW_WORKERS": "4", "LENS_MLFLOW_ALLOWED_HOSTS": "mlflow.team.io",
              "LENS_MLFLOW_CORS_ORIGINS": "https://ui.team.io", "LENS_MLFLOW_ADMIN_USER": "root",
              "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true", "LENS_IMAGE": "reg.io/lens",
              "LENS_IMAGE_TAG": "1.2.3", "LENS_POSTGRES_IMAGE": "postgres:17",
              "LENS_S3_IMAGE": "minio/minio:latest"}
    assert set(values) == set(services.ENV_VARS)
    for name, value in values.items():  # one at a time, each on top of the defaults
        clean_env.setenv(name, value)
        assert services.ServiceSettings.from_env() != base, f"{name} changed nothing"
        clean_env.delenv(name)
    for name, value in values.items():  # all together: MLflow's S3 endpoint wins over AWS's
        clean_env.setenv(name, value)
    assert services.ServiceSettings.from_env().s3_endpoint_url == "http://s3:9000"


def test_postgres_password_stays_out_of_urls_args_and_files(clean_env: pytest.MonkeyPatch
                                                            ) -> None:
    clean_env.setenv("LENS_POSTGRES_URL", "postgresql://lens:s%40cret-pw@db:5432")
    s = services.ServiceSettings.from_env()
    assert s.postgres_password == "s@cret-pw"
    texts = [repr(s), s.mlflow_backend_store_uri, s.mlflow_auth_db_uri, s.prefect_database_url,
             *services.mlflow_command(s), *services.prefect_command(s),
             services.write_auth_config(s).read_text()]
    assert not [t for t in texts if "cret" in t]
    assert s.mlflow_backend_store_uri == "postgresql+psycopg2://lens@db:5432/lens_mlflow"
    assert services.mlflow_env(s, "x" * 12)["PGPASSWORD"] == "s@cret-pw"
    assert services.prefect_env(s)["PGPASSWORD"] == "s@cret-pw"
    assert services.redact("postgresql://u:pw@h/d") == "postgresql://u:***@h/d"


@pytest.mark.parametrize(("name", "value", "says"), [
    ("LENS_MLFLOW_PORT", "http", "LENS_MLFLOW_PORT='http' is not an integer"),
    ("LENS_MLFLOW_WORKERS", "0", "LENS_MLFLOW_WORKERS=0 must be >= 1"),
    ("LENS_MLFLOW_ARTIFACTS", "/data/mlartifacts", "is not an S3 URL"),
    ("LENS_POSTGRES_URL", "mysql://root@db", "is not a PostgreSQL URL"),
    ("LENS_POSTGRES_URL", "postgresql://u:pw@db/mlflow", "names a database"),
    ("LENS_MLFLOW_ALLOWED_HOSTS", "mlflow,*", "list the hosts"),
])
def test_bad_settings_name_the_variable(clean_env: pytest.MonkeyPatch, name: str, value: str,
                                        says: str) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=name) as err:
        services.ServiceSettings.from_env()
    assert says in str(err.value) and "pw" not in str(err.value).replace("***", "")


def test_admin_password_refused_when_missing_empty_stock_or_short(
        clean_env: pytest.MonkeyPatch) -> None:
    stock = services.stock_admin_password()  # first: it silences the app's import warnings
    from mlflow.server.auth import _LEGACY_DEFAULT_ADMIN_PASSWORD

    assert stock == _LEGACY_DEFAULT_ADMIN_PASSWORD
    for value, says in [(None, "is not set"), ("", "is empty"), ("   ", "is empty"),
                        (stock, "stock default admin password"), ("short-pw", "at least 12")]:
        if value is None:
            clean_env.delenv("LENS_MLFLOW_ADMIN_PASSWORD", raising=False)
        else:
            clean_env.setenv("LENS_MLFLOW_ADMIN_PASSWORD", value)
        with pytest.raises(services.ServiceError, match="LENS_MLFLOW_ADMIN_PASSWORD") as err:
            services.admin_password()
        assert says in str(err.value) and "export LENS_MLFLOW_ADMIN_PASSWORD" in str(err.value)
    clean_env.setenv("LENS_MLFLOW_ADMIN_PASSWORD", "a-long-enough-secret")
    assert services.admin_password() == "a-long-enough-secret"


def test_cli_up_refuses_a_missing_password_before_starting_anything(
        clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["services", "up"]) == 1
    err = capsys.readouterr().err
    assert "LENS_MLFLOW_ADMIN_PASSWORD is not set" in err
    settings = services.ServiceSettings.from_env()
    assert not settings.pid_file("mlflow").exists() and not settings.pid_file("prefect").exists()


def test_auth_config_is_private_and_holds_no_secret(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LENS_MLFLOW_ADMIN_PASSWORD", "a-long-enough-secret")
    s = services.ServiceSettings.from_env()
    path = services.write_auth_config(s)
    assert path.parent == s.home and path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert f"database_uri = {s.mlflow_auth_db_uri}" in text and "admin_username = admin" in text
    assert "a-long-enough-secret" not in text and "admin_password" not in text
    key = services.flask_secret_key(s)  # generated once, private, reused
    assert len(key) >= 32 and services.flask_secret_key(s) == key
    assert s.secret_key_file.stat().st_mode & 0o777 == 0o600
    env = services.mlflow_env(s, services.admin_password())
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(path)
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "a-long-enough-secret"
    assert "MLFLOW_TRACKING_URI" not in env  # a client's setting never leaks into the server
    assert "LENS_MLFLOW_ADMIN_PASSWORD" not in env  # only MLflow's own name for it
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "s3-secret")
    assert services.mlflow_env(s, "x" * 12)["AWS_SECRET_ACCESS_KEY"] == "s3-secret"
    clean_env.setenv("AWS_SESSION_TOKEN", "s3-session")
    clean_env.setenv("HF_TOKEN", "hub-token")  # a secret no list names
    assert services.mlflow_env(s, "x" * 12)["AWS_SESSION_TOKEN"] == "s3-session"
    assert "HF_TOKEN" not in services.mlflow_env(s, "x" * 12)
    prefect = services.prefect_env(s)  # the Prefect server gets no MLflow or S3 secret
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN",
                "LENS_MLFLOW_ADMIN_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD"} & set(prefect)


def test_runtime_files_are_git_ignored() -> None:
    """The default state folder (.lens/services) is never committed."""
    proc = subprocess.run(["git", "check-ignore", "-q", ".lens/services/mlflow-auth.ini"],
                          cwd=REPO, capture_output=True)
    assert proc.returncode == 0, ".lens/ must stay in .gitignore"


def test_server_sh_launches_what_lens_services_launches(clean_env: pytest.MonkeyPatch) -> None:
    env = {"LENS_MLFLOW_PORT": "5123", "LENS_POSTGRES_URL": "postgresql://lens:pw@db:5433",
           "LENS_MLFLOW_DB": "mdb", "LENS_MLFLOW_ARTIFACTS": "s3://team/ml/",
           "LENS_MLFLOW_WORKERS": "3", "LENS_MLFLOW_CORS_ORIGINS": "https://ui.team.io"}
    for key, value in env.items():
        clean_env.setenv(key, value)
    s = services.ServiceSettings.from_env()
    proc = subprocess.run(["bash", str(REPO / "mlflow" / "server.sh"), "--print"],
                          capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == services.mlflow_command(s)
    assert "pw" not in proc.stdout


def test_a_server_that_fails_to_start_is_reported_with_its_log(
        clean_env: pytest.MonkeyPatch) -> None:
    """Exited early: the error shows the log's end. Never healthy: stopped at the timeout,
    its whole process group with it, and the pid file gone."""
    s = services.ServiceSettings.from_env()
    s.home.mkdir(parents=True)
    pid = services._spawn(s, "mlflow", ["sh", "-c", "echo no such database >&2; exit 3"],
                          dict(os.environ))
    with pytest.raises(services.ServiceError, match="mlflow exited while starting") as err:
        services._wait_healthy(s, "mlflow", pid, timeout=30)
    assert "no such database" in str(err.value) and str(s.log_file("mlflow")) in str(err.value)
    pid = services._spawn(s, "prefect", ["sh", "-c", "echo starting; sleep 60 & sleep 60"],
                          dict(os.environ))
    with pytest.raises(services.ServiceError, match="not healthy at .* within 2 s") as err:
        services._wait_healthy(s, "prefect", pid, timeout=2)
    assert "starting" in str(err.value) and not _group(pid)
    assert services.read_pid(s, "prefect") is None and not s.pid_file("prefect").exists()


def test_readme_documents_every_variable() -> None:
    text = (REPO / "mlflow" / "README.md").read_text()
    missing = [n for n in (*services.ENV_VARS, *services.SECRET_ENV_VARS) if f"`{n}" not in text]
    assert not missing, f"mlflow/README.md does not document {missing}"
    assert not [p for p in (REPO / "mlflow").iterdir() if p.suffix == ".py"]  # never shadows


def test_status_when_nothing_runs(clean_env: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["services", "status"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["mlflow:", "prefect:"]
    assert all("stopped" in line for line in out)


# --- the real servers (slow: about 35 s to start both on 2 CPUs) ------------------------------

def _cli(stack_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lens.cli", "services", *args], cwd=REPO,
                          env=stack_env, capture_output=True, text=True, timeout=300)


def _group(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


@pytest.mark.slow
def test_up_is_idempotent_and_prints_one_line_per_service(stack) -> None:
    s = stack.settings
    pids = {name: services.read_pid(s, name) for name in services.SERVICES}
    assert all(pids.values())
    proc = _cli(stack.env, "up")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"mlflow: http://127.0.0.1:{s.mlflow_port}",
                                        f"prefect: http://127.0.0.1:{s.prefect_port}/api"]
    assert "already running" in proc.stderr
    assert {name: services.read_pid(s, name) for name in services.SERVICES} == pids
    servers = subprocess.run(["pgrep", "-f", f"mlflow server .*--port {s.mlflow_port}"],
                             capture_output=True, text=True).stdout.split()
    assert servers == [str(pids["mlflow"])]  # one server, not two
    status = _cli(stack.env, "status")
    assert status.returncode == 0 and status.stdout.count("healthy)") == 2
    print(f"\nstartup seconds (db upgrade + ready): {stack.seconds}")


@pytest.mark.slow
def test_mlflow_refuses_requests_without_the_right_credentials(stack) -> None:
    read = ("GET", "/api/2.0/mlflow/experiments/search?max_results=5", None)
    write = ("POST", "/api/2.0/mlflow/experiments/create", {"name": "auth-check"})
    wrong = (stack.settings.admin_user, stack.password + "x")
    for method, path, body in (read, write):
        assert stack.request(method, path, body) in (401, 403), f"{method} {path} anonymous"
        assert stack.request(method, path, body, wrong) in (401, 403), f"{method} {path} wrong"
        assert stack.request(method, path, body, ("nobody", stack.password)) in (401, 403)
    right = (stack.settings.admin_user, stack.password)
    assert stack.request(*read, auth=right) == 200
    assert stack.request(*write, auth=right) == 200
    # the stock admin password is refused by the server too, and so is a foreign Host header
    assert stack.request(*read, auth=("admin", services.stock_admin_password())) in (401, 403)
    import urllib.error
    import urllib.request

    req = urllib.request.Request(stack.settings.mlflow_url + read[1],
                                 headers={"Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 403


@pytest.mark.slow
def test_mlflow_client_logs_to_postgres_and_s3(stack) -> None:
    """A client with MLFLOW_TRACKING_USERNAME/PASSWORD logs a run; its artifact lands in the
    bucket through the server's proxy, and its metric in PostgreSQL."""
    code = ("import mlflow\n"
            "mlflow.set_experiment('client-check')\n"
            "with mlflow.start_run() as run:\n"
            "    mlflow.log_metric('m', 1.5, step=3)\n"
            "    mlflow.log_text('hello', 'notes/hello.txt')\n"
            "print(run.info.run_id)\n")
    env = {k: v for k, v in stack.env.items()
           if not k.startswith(("AWS_", "MLFLOW_S3"))} | stack.client_env  # no S3 creds
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = proc.stdout.split()[-1]
    assert [k for k in stack.s3.keys("mlflow/") if k.endswith(f"{run_id}/artifacts/notes/"
                                                              "hello.txt")]
    import psycopg2

    conn = psycopg2.connect(f"postgresql://postgres@127.0.0.1:5432/{stack.settings.mlflow_db}")
    with conn, conn.cursor() as cur:
        cur.execute("SELECT value, step FROM metrics WHERE run_uuid = %s AND key = 'm'",
                    (run_id,))
        assert cur.fetchall() == [(1.5, 3)]
    conn.close()


@pytest.mark.slow
def test_prefect_server_runs_on_postgres(stack) -> None:
    import json
    import urllib.request

    req = urllib.request.Request(f"{stack.settings.prefect_api_url}/flows/", method="POST",
                                 data=json.dumps({"name": "services-check"}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        flow_id = json.loads(resp.read())["id"]
    import psycopg2

    conn = psycopg2.connect(f"postgresql://postgres@127.0.0.1:5432/{stack.settings.prefect_db}")
    with conn, conn.cursor() as cur:
        cur.execute("SELECT name FROM flow WHERE id = %s", (flow_id,))
        assert cur.fetchall() == [("services-check",)]
    conn.close()


@pytest.mark.slow
def test_down_stops_every_process_of_each_service(stack) -> None:
    s = stack.settings
    pids = {name: services.read_pid(s, name) for name in services.SERVICES}
    assert len(_group(pids["mlflow"])) >= 2 and _group(pids["prefect"])  # mlflow has workers
    proc = _cli(stack.env, "down")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["mlflow: stopped", "prefect: stopped"]
    assert all(_group(pid) == [] for pid in pids.values())
    assert not s.pid_file("mlflow").exists() and not s.pid_file("prefect").exists()
    status = _cli(stack.env, "status")
    assert status.returncode == 1 and status.stdout.count("stopped") == 2


def test_a_pid_file_naming_a_reused_pid_is_stale(clean_env: pytest.MonkeyPatch) -> None:
    """After a reboot or crash the pid in a pid file may belong to an unrelated process:
    `down` must not signal it, `status` must not report it."""
    s = services.ServiceSettings.from_env()
    s.home.mkdir(parents=True, exist_ok=True)
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        s.pid_file("mlflow").write_text(json.dumps({"pid": sleeper.pid, "started": "old-boot:1"}))
        assert services.read_pid(s, "mlflow") is None
        assert services.down(s, ("mlflow",)) == [] and sleeper.poll() is None
        s.pid_file("mlflow").write_text(json.dumps(
            {"pid": sleeper.pid, "started": services._started(sleeper.pid)}))
        assert services.read_pid(s, "mlflow") == sleeper.pid  # the process it started
    finally:
        sleeper.kill()
        sleeper.wait()
