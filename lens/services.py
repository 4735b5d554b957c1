"""Team services: MLflow and Prefect servers on PostgreSQL + S3, with MLflow's basic auth.

One source of truth for the team deployment: ``ServiceSettings`` resolves every setting from
the environment (``ENV_VARS`` names each variable it reads, so infra files can be checked
against it), and ``up`` / ``down`` / ``status`` run the servers on this machine:

    LENS_MLFLOW_ADMIN_PASSWORD=... AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... lens services up
    lens services status
    lens services down

Credentials come only from the environment (``SECRET_ENV_VARS``); they are never written to a
committed file or a log. MLflow's auth config (admin user, auth database) is generated at
runtime into ``$LENS_HOME/services/`` with mode 0600.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from lens_model import atomic, defaults
from lens_model.secrets import is_secret_name, redact

# Every variable ServiceSettings reads, with its default ("" = unset) and what it means.
ENV_VARS: dict[str, tuple[str, str]] = {
    "LENS_HOME": (".lens", "local state; pid files and logs go under $LENS_HOME/services"),
    "LENS_SERVICES_HOST": ("127.0.0.1", "the address both servers bind and are reached at"),
    "LENS_MLFLOW_PORT": ("5000", "MLflow tracking server port"),
    "LENS_PREFECT_PORT": ("4200", "Prefect server port"),
    "LENS_POSTGRES_URL": ("postgresql://postgres@127.0.0.1:5432",
                          "the PostgreSQL server, no database (password: PGPASSWORD)"),
    "LENS_MLFLOW_DB": ("lens_mlflow", "database of MLflow's backend store"),
    "LENS_MLFLOW_AUTH_DB": ("lens_mlflow_auth", "database of MLflow's basic-auth users"),
    "LENS_PREFECT_DB": ("lens_prefect", "database of the Prefect server"),
    "LENS_MLFLOW_ARTIFACTS": ("s3://lens-mlflow/artifacts",
                              "artifact destination s3://bucket/prefix, proxied by the server"),
    "MLFLOW_S3_ENDPOINT_URL": ("", "S3 endpoint for MLflow (moto, MinIO); unset = AWS"),
    "AWS_ENDPOINT_URL": ("", "S3 endpoint when MLFLOW_S3_ENDPOINT_URL is unset"),
    "AWS_DEFAULT_REGION": ("us-east-1", "S3 region"),
    "LENS_MLFLOW_WORKERS": ("1", "MLflow server worker processes"),
    "LENS_MLFLOW_ALLOWED_HOSTS": ("", "Host headers MLflow accepts (comma-separated); "
                                  "unset = the host and localhost on the MLflow port"),
    "LENS_MLFLOW_CORS_ORIGINS": ("", "origins allowed cross-site (comma-separated); "
                                 "unset = the MLflow URL itself"),
    "LENS_MLFLOW_ADMIN_USER": ("admin", "MLflow basic-auth admin user"),
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": ("false", "MLflow's GenAI job runner (huey "
                                           "workers); off: this platform runs no server jobs"),
    "LENS_IMAGE": ("lens-platform", "image holding this project (runs MLflow and Prefect)"),
    "LENS_IMAGE_TAG": ("0.1.0", "tag of LENS_IMAGE"),
    "LENS_POSTGRES_IMAGE": ("postgres:16", "PostgreSQL image"),
    "LENS_S3_IMAGE": ("minio/minio:RELEASE.2024-12-13T22-19-12Z",
                      "S3 server image of the docker-compose stack (MinIO, data on a volume)"),
}
# Read from the environment only, never defaulted, written to a committed file, or logged.
SECRET_ENV_VARS: tuple[str, ...] = (
    "LENS_MLFLOW_ADMIN_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY")
# What clients of the servers set (the pipeline, `lens run`, tests).
CLIENT_ENV_VARS: tuple[str, ...] = (
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "PREFECT_API_URL")
SERVICES = ("mlflow", "prefect")


def _env(name: str) -> str:
    return os.environ.get(name) or ENV_VARS[name][0]


def _int_env(name: str) -> int:
    raw = _env(name)
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer; set it to a number, "
                         f"e.g. {name}={ENV_VARS[name][0]}") from None


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in raw.split(",") if v.strip())


@dataclass(frozen=True)
class ServiceSettings:
    """The team deployment's settings; ``from_env()`` resolves them (see ``ENV_VARS``)."""

    host: str = "127.0.0.1"
    mlflow_port: int = 5000
    prefect_port: int = 4200
    postgres_url: str = "postgresql://postgres@127.0.0.1:5432"
    mlflow_db: str = "lens_mlflow"
    mlflow_auth_db: str = "lens_mlflow_auth"
    prefect_db: str = "lens_prefect"
    artifacts_destination: str = "s3://lens-mlflow/artifacts"
    s3_endpoint_url: str = ""
    region: str = "us-east-1"
    workers: int = 1
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    admin_user: str = "admin"
    mlflow_jobs: bool = False
    image: str = "lens-platform"
    image_tag: str = "0.1.0"
    postgres_image: str = "postgres:16"
    s3_image: str = "minio/minio:RELEASE.2024-12-13T22-19-12Z"
    home: Path = field(default_factory=lambda: defaults.lens_home() / "services")
    # A password given in LENS_POSTGRES_URL moves here and reaches the servers as PGPASSWORD,
    # so it never shows in a URL, a process's arguments, a config file or a repr.
    postgres_password: str = field(default="", repr=False, compare=False)

    @classmethod
    def from_env(cls) -> ServiceSettings:
        """Settings from the environment, each unset variable at its default."""
        pg = urlsplit(_env("LENS_POSTGRES_URL").rstrip("/"))
        password = unquote(pg.password or "")
        if pg.password is not None:
            pg = pg._replace(netloc=pg.netloc.replace(f":{pg.password}@", "@", 1))
        settings = cls(
            host=_env("LENS_SERVICES_HOST"),
            mlflow_port=_int_env("LENS_MLFLOW_PORT"),
            prefect_port=_int_env("LENS_PREFECT_PORT"),
            postgres_url=urlunsplit(pg),
            postgres_password=password,
            mlflow_db=_env("LENS_MLFLOW_DB"),
            mlflow_auth_db=_env("LENS_MLFLOW_AUTH_DB"),
            prefect_db=_env("LENS_PREFECT_DB"),
            artifacts_destination=_env("LENS_MLFLOW_ARTIFACTS").rstrip("/"),
            s3_endpoint_url=_env("MLFLOW_S3_ENDPOINT_URL") or _env("AWS_ENDPOINT_URL"),
            region=_env("AWS_DEFAULT_REGION"),
            workers=_int_env("LENS_MLFLOW_WORKERS"),
            allowed_hosts=_csv(_env("LENS_MLFLOW_ALLOWED_HOSTS")),
            cors_origins=_csv(_env("LENS_MLFLOW_CORS_ORIGINS")),
            admin_user=_env("LENS_MLFLOW_ADMIN_USER"),
            mlflow_jobs=_env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION").lower() in ("true", "1"),
            image=_env("LENS_IMAGE"),
            image_tag=_env("LENS_IMAGE_TAG"),
            postgres_image=_env("LENS_POSTGRES_IMAGE"),
            s3_image=_env("LENS_S3_IMAGE"),
            home=defaults.lens_home() / "services",
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Fail early, naming the variable, on settings the servers would reject later."""
        if not self.postgres_url.startswith(("postgresql://", "postgresql+")):
            raise ValueError(f"LENS_POSTGRES_URL={redact(self.postgres_url)!r} is not a "
                             "PostgreSQL URL; use postgresql://USER@HOST:PORT (no database)")
        if urlsplit(self.postgres_url).path.strip("/"):
            raise ValueError(f"LENS_POSTGRES_URL={redact(self.postgres_url)!r} names a database; "
                             "give the server only and name the databases with LENS_MLFLOW_DB, "
                             "LENS_MLFLOW_AUTH_DB and LENS_PREFECT_DB")
        if not self.artifacts_destination.startswith("s3://"):
            raise ValueError(f"LENS_MLFLOW_ARTIFACTS={self.artifacts_destination!r} is not an "
                             "S3 URL; use s3://BUCKET/PREFIX")
        if self.workers < 1:
            raise ValueError(f"LENS_MLFLOW_WORKERS={self.workers} must be >= 1")
        for var, values in (("LENS_MLFLOW_ALLOWED_HOSTS", self.allowed_hosts),
                            ("LENS_MLFLOW_CORS_ORIGINS", self.cors_origins)):
            if "*" in values:  # would switch MLflow's DNS-rebinding and CSRF guards off
                raise ValueError(f"{var} holds '*'; list the hosts or origins explicitly")

    # URLs the servers and their clients use
    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    def database_url(self, database: str, driver: str = "") -> str:
        """``postgres_url`` with ``database`` as its path and an optional SQLAlchemy driver."""
        parts = urlsplit(self.postgres_url)
        scheme = "postgresql" + (f"+{driver}" if driver else "")
        return urlunsplit(parts._replace(scheme=scheme, path=f"/{database}"))

    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; this project ships psycopg2.
    @property
    def mlflow_backend_store_uri(self) -> str:
        return self.database_url(self.mlflow_db, "psycopg2")

    @property
    def mlflow_auth_db_uri(self) -> str:
        return self.database_url(self.mlflow_auth_db, "psycopg2")

    @property
    def prefect_database_url(self) -> str:
        """Prefect's ``PREFECT_API_DATABASE_CONNECTION_URL`` (async driver)."""
        return self.database_url(self.prefect_db, "asyncpg")

    @property
    def databases(self) -> tuple[str, ...]:
        return (self.mlflow_db, self.mlflow_auth_db, self.prefect_db)

    @property
    def bucket(self) -> str:
        return urlsplit(self.artifacts_destination).netloc

    @property
    def mlflow_allowed_hosts(self) -> tuple[str, ...]:
        """Host headers MLflow's security middleware accepts."""
        port = self.mlflow_port
        return self.allowed_hosts or (f"{self.host}:{port}", f"localhost:{port}",
                                      self.host, "localhost")

    @property
    def mlflow_cors_origins(self) -> tuple[str, ...]:
        return self.cors_origins or (self.mlflow_url, f"http://localhost:{self.mlflow_port}")

    @property
    def images(self) -> dict[str, str]:
        """Image per service, as the docker-compose and k8s files name them."""
        lens = f"{self.image}:{self.image_tag}"
        return {"mlflow": lens, "prefect": lens, "postgres": self.postgres_image,
                "s3": self.s3_image}

    # where the launcher keeps its state
    def pid_file(self, service: str) -> Path:
        return self.home / f"{service}.pid"

    def log_file(self, service: str) -> Path:
        return self.home / f"{service}.log"

    @property
    def auth_config_file(self) -> Path:
        return self.home / "mlflow-auth.ini"

    @property
    def secret_key_file(self) -> Path:
        """MLflow's CSRF key when MLFLOW_FLASK_SERVER_SECRET_KEY is unset (generated, 0600)."""
        return self.home / "mlflow-secret-key"


# ---------------------------------------------------------------------------------------------
# The launcher: `lens services up|down|status`
# ---------------------------------------------------------------------------------------------

class ServiceError(RuntimeError):
    """A service could not be started, checked or stopped; the message says how to fix it."""


MIN_PASSWORD_LEN = 12  # MLflow's basic-auth password policy (mlflow.utils.validation)


def stock_admin_password() -> str:
    """The admin password older MLflow versions shipped in basic_auth.ini (publicly known)."""
    try:
        with warnings.catch_warnings():  # Starlette deprecations raised inside MLflow's app
            warnings.simplefilter("ignore")
            from mlflow.server import auth
    except ImportError as exc:  # Flask-WTF, MLflow's `auth` extra
        raise ServiceError(f"MLflow's basic-auth app cannot load ({exc}); install it with "
                           "`pip install 'mlflow[auth]'`") from None
    return auth._LEGACY_DEFAULT_ADMIN_PASSWORD


def admin_password() -> str:
    """``LENS_MLFLOW_ADMIN_PASSWORD``, refused when missing, empty, short or MLflow's stock one."""
    name = "LENS_MLFLOW_ADMIN_PASSWORD"
    fix = (f"export {name} to a secret of at least {MIN_PASSWORD_LEN} characters, e.g. "
           f"`export {name}=$(openssl rand -base64 24)`, from your secret store")
    password = os.environ.get(name)
    if password is None:
        raise ServiceError(f"{name} is not set: the MLflow server needs an admin password; {fix}")
    if not password.strip():
        raise ServiceError(f"{name} is empty; {fix}")
    if password == stock_admin_password():
        raise ServiceError(f"{name} is MLflow's stock default admin password, which is public; "
                           f"{fix}")
    if len(password) < MIN_PASSWORD_LEN:
        raise ServiceError(f"{name} has {len(password)} characters; MLflow needs at least "
                           f"{MIN_PASSWORD_LEN}; {fix}")
    return password


def tool_path(tool: str) -> str:
    """``tool`` from this interpreter's environment (the venv), else from PATH."""
    local = Path(sys.executable).parent / tool
    return str(local) if local.exists() else tool


def ensure_databases(settings: ServiceSettings) -> list[str]:
    """Create the missing databases of ``settings.databases``; returns the ones created."""
    import psycopg2
    from psycopg2 import sql

    try:
        conn = psycopg2.connect(settings.database_url("postgres"),
                                password=settings.postgres_password or None, connect_timeout=10)
    except psycopg2.OperationalError as exc:
        raise ServiceError(f"cannot reach PostgreSQL at {settings.postgres_url} "
                           f"({str(exc).strip()}); start it or fix LENS_POSTGRES_URL / "
                           "PGPASSWORD") from None
    created = []
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            for name in dict.fromkeys(settings.databases):
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    try:
                        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                        created.append(name)
                    except psycopg2.errors.DuplicateDatabase:  # another `up` won the race
                        pass
    finally:
        conn.close()
    return created


def s3_client(settings: ServiceSettings):  # noqa: ANN201 (boto3's client type is generated)
    """A boto3 S3 client on the settings' endpoint (credentials from the environment)."""
    import boto3

    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url or None,
                        region_name=settings.region)


def check_bucket(settings: ServiceSettings) -> None:
    """Fail now, not at the first artifact upload, when the artifact bucket is unreachable."""
    import botocore.exceptions

    client = s3_client(settings)
    where = f"{settings.bucket} at {settings.s3_endpoint_url or 'AWS S3'}"
    try:
        client.head_bucket(Bucket=settings.bucket)
    except botocore.exceptions.NoCredentialsError:
        raise ServiceError("no S3 credentials: export AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY (or an AWS profile) for the artifact bucket "
                           f"{where}") from None
    except botocore.exceptions.EndpointConnectionError:
        raise ServiceError(f"cannot reach the S3 endpoint for bucket {where}; start it or fix "
                           "MLFLOW_S3_ENDPOINT_URL / AWS_ENDPOINT_URL") from None
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        raise ServiceError(f"artifact bucket {where} is not usable (S3 error {code}); create it "
                           f"(`aws s3 mb s3://{settings.bucket}`) or fix LENS_MLFLOW_ARTIFACTS "
                           "and the S3 credentials") from None


def write_auth_config(settings: ServiceSettings) -> Path:
    """MLflow's basic-auth config (admin user, auth database), mode 0600. It holds no secret:
    the admin password reaches the server as MLFLOW_AUTH_ADMIN_PASSWORD, the database's as
    PGPASSWORD."""
    text = "\n".join([
        "# Generated by `lens services up` from the environment; do not commit or edit.",
        "[mlflow]",
        "default_permission = READ",
        f"database_uri = {settings.mlflow_auth_db_uri}",
        f"admin_username = {settings.admin_user}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access = false",
        ""])
    path = settings.auth_config_file
    atomic.write_text(path, text)  # a mkstemp file: 0600 from the start
    path.chmod(0o600)
    return path


def flask_secret_key(settings: ServiceSettings) -> str:
    """The basic-auth app's CSRF key: MLFLOW_FLASK_SERVER_SECRET_KEY, else one generated once
    into ``settings.secret_key_file`` (0600) so restarts keep users' sessions valid. Servers
    behind one URL must share it: set the variable from a secret store there."""
    if key := os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        return key
    path = settings.secret_key_file
    if not path.is_file():
        atomic.write_text(path, secrets.token_urlsafe(32))
    path.chmod(0o600)
    return path.read_text().strip()


def mlflow_upgrade_command(settings: ServiceSettings) -> list[str]:
    return [tool_path("mlflow"), "db", "upgrade", settings.mlflow_backend_store_uri]


def mlflow_command(settings: ServiceSettings) -> list[str]:
    """`mlflow server`: PostgreSQL stores, artifacts proxied to S3, basic auth, security
    middleware with explicit hosts and origins."""
    return [
        tool_path("mlflow"), "server",
        "--backend-store-uri", settings.mlflow_backend_store_uri,
        "--serve-artifacts", "--artifacts-destination", settings.artifacts_destination,
        "--app-name", "basic-auth",
        "--host", settings.host, "--port", str(settings.mlflow_port),
        "--workers", str(settings.workers),
        "--allowed-hosts", ",".join(settings.mlflow_allowed_hosts),
        "--cors-allowed-origins", ",".join(settings.mlflow_cors_origins),
    ]


def prefect_command(settings: ServiceSettings) -> list[str]:
    return [tool_path("prefect"), "server", "start", "--host", settings.host,
            "--port", str(settings.prefect_port), "--analytics-off", "--ui"]


def _base_env(settings: ServiceSettings, keep: tuple[str, ...] = ()) -> dict[str, str]:
    """This environment without clients' settings, and without the secrets not in ``keep``:
    each server gets only the credentials it uses."""
    drop = set(CLIENT_ENV_VARS) | set(SECRET_ENV_VARS)
    keep = (*keep, "PGPASSWORD")  # both servers reach PostgreSQL
    env = {k: v for k, v in os.environ.items()
           if k in keep or (k not in drop and not is_secret_name(k))}
    env.update(defaults.OFFLINE_ENV)
    if settings.postgres_password:
        env["PGPASSWORD"] = settings.postgres_password
    return env


def mlflow_env(settings: ServiceSettings, password: str) -> dict[str, str]:
    env = _base_env(settings, keep=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                    "AWS_SESSION_TOKEN")) | {
        "MLFLOW_AUTH_CONFIG_PATH": str(settings.auth_config_file),
        "MLFLOW_AUTH_ADMIN_USERNAME": settings.admin_user,
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": flask_secret_key(settings),
        "AWS_DEFAULT_REGION": settings.region,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": str(settings.mlflow_jobs).lower(),
    }
    if settings.s3_endpoint_url:
        env["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    return env


def prefect_env(settings: ServiceSettings) -> dict[str, str]:
    return _base_env(settings) | {
        "PREFECT_API_DATABASE_CONNECTION_URL": settings.prefect_database_url,
        "PREFECT_HOME": str(settings.home / "prefect-server"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",
    }


# --- processes: pid files, health, process groups ---------------------------------------------

def health_url(settings: ServiceSettings, service: str) -> str:
    return {"mlflow": f"{settings.mlflow_url}/health",
            "prefect": f"{settings.prefect_api_url}/health"}[service]


def service_url(settings: ServiceSettings, service: str) -> str:
    return {"mlflow": settings.mlflow_url, "prefect": settings.prefect_api_url}[service]


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, our exited child not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _started(pid: int) -> str:
    """When ``pid`` started (boot id + start time in ticks), so a pid file outliving its
    process (a reboot, a crash) never names the unrelated process that reuses the number."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return ""


def read_pid(settings: ServiceSettings, service: str) -> int | None:
    """The pid of ``service`` when its pid file names the live process it started, else None."""
    try:
        record = json.loads(settings.pid_file(service).read_text())
        pid = int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if _alive(pid) and record.get("started") == _started(pid) else None


def _port_busy(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


_CHILDREN: dict[int, subprocess.Popen] = {}  # reaped by down() when this process started them


def _spawn(settings: ServiceSettings, service: str, cmd: list[str],
           env: dict[str, str]) -> int:
    """Start ``cmd`` detached in its own process group, output appended to its log."""
    log = settings.log_file(service)
    with open(log, "ab") as fh:
        fh.write(f"\n--- lens services up {service} {time.strftime('%F %T')}\n".encode())
        fh.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, env=env, cwd=settings.home,
                                start_new_session=True)
    _CHILDREN[proc.pid] = proc
    atomic.write_json(settings.pid_file(service), {"pid": proc.pid, "started": _started(proc.pid)})
    return proc.pid


def _wait_healthy(settings: ServiceSettings, service: str, pid: int, timeout: float) -> None:
    url, log = health_url(settings, service), settings.log_file(service)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(url):
            return
        if not _alive(pid):
            _forget(settings, service, pid)
            raise ServiceError(f"{service} exited while starting (see {log}); its log ends:\n"
                               f"{log_tail(log)}")
        time.sleep(0.5)
    _stop(settings, service, pid)
    raise ServiceError(f"{service} was not healthy at {url} within {timeout:.0f} s, so it was "
                       f"stopped (see {log}); its log ends:\n{log_tail(log)}")


def _stop(settings: ServiceSettings, service: str, pid: int, grace: float = 15.0) -> None:
    """SIGTERM the service's process group (workers included), SIGKILL after ``grace``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(pid):
            _reap(pid)
            time.sleep(0.2)
        if not _group_alive(pid):
            break
    _forget(settings, service, pid)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return _alive(pgid) or any(_alive(int(d.name)) for d in Path("/proc").iterdir()
                               if d.name.isdigit() and _pgid(int(d.name)) == pgid)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:
        _CHILDREN.pop(pid, None)


def _forget(settings: ServiceSettings, service: str, pid: int) -> None:
    _reap(pid)
    path = settings.pid_file(service)
    try:
        if int(json.loads(path.read_text())["pid"]) == pid:
            path.unlink()
    except (OSError, ValueError, KeyError, TypeError):
        pass


def _check_admin_login(settings: ServiceSettings, password: str) -> None:
    """The admin password only creates the admin user; once the user exists MLflow keeps its
    stored password, so a changed LENS_MLFLOW_ADMIN_PASSWORD must fail here, not in clients."""
    url = f"{settings.mlflow_url}/api/2.0/mlflow/users/get?username={settings.admin_user}"
    token = base64.b64encode(f"{settings.admin_user}:{password}".encode()).decode()
    # The Host header must be one the security middleware allows, or a 403 would look like a
    # wrong password (the URL's host may be a bind address such as 0.0.0.0).
    req = urllib.request.Request(url, headers={"Authorization": f"Basic {token}",
                                               "Host": settings.mlflow_allowed_hosts[0]})
    try:
        with urllib.request.urlopen(req, timeout=10):
            return
    except urllib.error.HTTPError as exc:
        if exc.code not in (401, 403):
            raise ServiceError(f"checking the MLflow admin login at {url} gave HTTP {exc.code}; "
                               f"see {settings.log_file('mlflow')}") from None
        if b"host" in exc.read().lower():
            raise ServiceError(f"MLflow refused the Host header {req.get_header('Host')!r}; "
                               "add it to LENS_MLFLOW_ALLOWED_HOSTS") from None
    except urllib.error.URLError as exc:
        raise ServiceError(f"checking the MLflow admin login at {url} failed ({exc.reason}); "
                           f"see {settings.log_file('mlflow')}") from None
    raise ServiceError(
        f"LENS_MLFLOW_ADMIN_PASSWORD does not log in as {settings.admin_user!r}: that user "
        f"already exists in the auth database {settings.mlflow_auth_db!r} with another password. "
        "Export the stored password, or have an admin change it "
        "(PATCH /api/2.0/mlflow/users/update-password)")


def prepare_mlflow(settings: ServiceSettings, timeout: float) -> tuple[list[str], dict[str, str]]:
    """Everything before MLflow's server starts (password policy, bucket, auth config,
    ``mlflow db upgrade``); returns its command and environment. `lens services up` and the
    foreground entrypoint (`lens infra serve mlflow`, mlflow/server.sh) both start it so."""
    password = admin_password()
    check_bucket(settings)
    write_auth_config(settings)
    env = mlflow_env(settings, password)
    try:
        upgrade = subprocess.run(mlflow_upgrade_command(settings), env=env, cwd=settings.home,
                                 capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ServiceError(f"`mlflow db upgrade` on {settings.mlflow_backend_store_uri} took "
                           f"over {timeout:.0f} s; check PostgreSQL, or raise --timeout") from None
    if upgrade.returncode != 0:
        raise ServiceError(f"`mlflow db upgrade` on {settings.mlflow_backend_store_uri} failed "
                           f"(exit {upgrade.returncode}):\n{upgrade.stderr[-3000:]}")
    return mlflow_command(settings), env


def _start_mlflow(settings: ServiceSettings, timeout: float) -> float:
    started = time.perf_counter()
    cmd, env = prepare_mlflow(settings, timeout)
    pid = _spawn(settings, "mlflow", cmd, env)
    _wait_healthy(settings, "mlflow", pid, timeout)
    try:
        _check_admin_login(settings, env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    except ServiceError:
        _stop(settings, "mlflow", pid)
        raise
    return time.perf_counter() - started


def _start_prefect(settings: ServiceSettings, timeout: float) -> float:
    started = time.perf_counter()
    pid = _spawn(settings, "prefect", prefect_command(settings), prefect_env(settings))
    _wait_healthy(settings, "prefect", pid, timeout)
    return time.perf_counter() - started


def up(settings: ServiceSettings, services: tuple[str, ...] = SERVICES,
       timeout: float = 180.0) -> dict[str, float]:
    """Start ``services`` unless already running; returns seconds each start took (0 when it
    was running). Holds a lock so two concurrent ``up`` calls start one server each."""
    if "mlflow" in services:
        admin_password()  # a bad password fails before anything is created or started
    settings.home.mkdir(parents=True, exist_ok=True)
    took: dict[str, float] = {}
    with atomic.file_lock(settings.home / ".lock"):
        if any(read_pid(settings, s) is None for s in services):
            ensure_databases(settings)
        for service in services:
            pid = read_pid(settings, service)
            if pid is not None:
                if not healthy(health_url(settings, service)):
                    _wait_healthy(settings, service, pid, timeout)
                if service == "mlflow":  # running, but would this caller's login work?
                    _check_admin_login(settings, admin_password())
                took[service] = 0.0
                continue
            port = settings.mlflow_port if service == "mlflow" else settings.prefect_port
            if _port_busy(settings.host, port):
                var = f"LENS_{service.upper()}_PORT"
                raise ServiceError(f"port {settings.host}:{port} is taken by a process that "
                                   f"`lens services` did not start; stop it or set {var}")
            start = _start_mlflow if service == "mlflow" else _start_prefect
            took[service] = start(settings, timeout)
    return took


def down(settings: ServiceSettings, services: tuple[str, ...] = SERVICES) -> list[str]:
    """Stop the running ``services`` (their whole process groups); returns those stopped."""
    stopped = []
    settings.home.mkdir(parents=True, exist_ok=True)
    with atomic.file_lock(settings.home / ".lock"):
        for service in services:
            pid = read_pid(settings, service)
            if pid is None:
                settings.pid_file(service).unlink(missing_ok=True)  # stale
                continue
            _stop(settings, service, pid)
            stopped.append(service)
    for pid in list(_CHILDREN):  # servers this process started and another one stopped
        _reap(pid)
    return stopped


def status(settings: ServiceSettings) -> dict[str, dict[str, object]]:
    """``{service: {running, healthy, pid, url, log}}`` for each service."""
    out: dict[str, dict[str, object]] = {}
    for service in SERVICES:
        pid = read_pid(settings, service)
        out[service] = {"running": pid is not None, "pid": pid,
                        "healthy": pid is not None and healthy(health_url(settings, service)),
                        "url": service_url(settings, service),
                        "log": str(settings.log_file(service))}
    return out
