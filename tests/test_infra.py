"""The infra files (prefect.yaml, infra/prefect, infra/docker-compose.yml, infra/k8s) parsed
and cross-checked against lens.services.ServiceSettings and the code: every port, env var
name, image and secret reference. Each check returns the problems it finds, naming the file
and the item, so the tests below also show that a change made in one place only is caught."""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from lens import infra, services
from lens_model import defaults
from lens_model.train import launch
from tests.conftest import BIN, REPO
from tests.services_fixtures import moto_s3  # noqa: F401  (a fixture)

S = infra.default_settings()
INFRA = REPO / "infra"
REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
URL_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")


# --- what the code knows -----------------------------------------------------------------------

def _code_env_vars() -> set[str]:
    """LENS_* variables the project's Python reads (os.environ[...] / .get / getenv)."""
    pattern = re.compile(
        r"""(?:environ(?:\.get|\.setdefault)?\(?\[?|getenv\()\s*["'](LENS_[A-Z0-9_]+)""")
    names: set[str] = set()
    for folder in ("lens", "lens_model", "tasks", "flows"):
        for path in (REPO / folder).rglob("*.py"):
            names |= set(pattern.findall(path.read_text()))
    return names


def _prefect_settings() -> set[str]:
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_valid_setting_names

    return set(_get_valid_setting_names(Settings))


def _mlflow_vars() -> set[str]:
    import mlflow.environment_variables as ev

    return {v.name for v in vars(ev).values() if isinstance(v, ev._EnvironmentVariable)}


LENS_VARS = (set(services.ENV_VARS) | set(services.SECRET_ENV_VARS)
             | set(services.CLIENT_ENV_VARS) | set(defaults.OFFLINE_ENV) | set(launch.DS_ENV)
             | _code_env_vars())
PREFECT_VARS, MLFLOW_VARS = _prefect_settings(), _mlflow_vars()


def env_name_problems(where: str, names: list[str], image_env: set[str] = frozenset()) -> list[str]:
    out = []
    for name in names:
        if name in LENS_VARS or name in image_env:
            continue
        if name.startswith("PREFECT_") and name in PREFECT_VARS:
            continue
        if name.startswith("MLFLOW_") and name in MLFLOW_VARS:
            continue
        out.append(f"{where}: env var {name} is read by nothing (not in lens.services "
                   f"ENV_VARS/SECRET_ENV_VARS/CLIENT_ENV_VARS, the code, Prefect or MLflow)")
    return out


def resolve(value: str, secrets: dict[str, str] | None = None) -> str:
    """A compose value with ``${VAR:-default}`` at its default and ``${SECRET:?}`` filled."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.groups()
        if op and op.endswith("-"):
            return arg
        return (secrets or {}).get(name, f"<{name}>")
    return REF.sub(one, value)


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(k) + _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


# --- docker-compose ----------------------------------------------------------------------------

def _port_map(entry: str) -> tuple[str, int]:
    published, _, target = entry.rpartition(":")
    return published, int(target)


def compose_problems(doc: dict[str, Any]) -> list[str]:
    out: list[str] = []
    svc = doc["services"]
    # every reference: a known variable, the services' default, secrets required
    for text in _strings(doc):
        for name, op, arg in REF.findall(text):
            if name in services.SECRET_ENV_VARS:
                if op != ":?":
                    out.append(f"compose: secret {name} must be required (${{{name}:?...}}), "
                               f"not defaulted")
            elif name not in services.ENV_VARS:
                out.append(f"compose: ${{{name}}} is not a lens.services setting")
            elif op != ":-" or arg != services.ENV_VARS[name][0]:
                out.append(f"compose: ${{{name}}} must default to lens.services' "
                           f"{services.ENV_VARS[name][0]!r} (${{{name}:-...}}), got {text!r}")
        if URL_PASSWORD.search(resolve(text)):
            out.append(f"compose: a URL with a literal password: {text!r}")
    for name, service in svc.items():
        env = service.get("environment", {})
        out += env_name_problems(f"compose {name}", list(env), infra.IMAGE_ENV.get(name, set()))
        for key, value in env.items():
            if key in infra.SECRET_VALUED:
                m = REF.fullmatch(str(value))
                if not (m and m.group(1) in services.SECRET_ENV_VARS and m.group(2) == ":?"):
                    out.append(f"compose {name}: {key} must be a required reference to a secret "
                               f"env var, got {value!r}")
        for dep in service.get("depends_on", {}):
            if dep not in svc:
                out.append(f"compose {name}: depends on unknown service {dep}")
    images = {name: resolve(svc[name]["image"]) for name in svc}
    for name, want in (("postgres", S.images["postgres"]), ("s3", S.images["s3"]),
                       ("mlflow", S.images["mlflow"]), ("prefect", S.images["prefect"]),
                       ("worker", S.images["mlflow"])):
        if images.get(name) != want:
            out.append(f"compose {name}: image {images.get(name)!r} != ServiceSettings' {want!r}")
    # servers: what `serve` will run, built from the container's own environment
    secrets = {n: "x" * 16 for n in services.SECRET_ENV_VARS}
    built: dict[str, services.ServiceSettings] = {}
    for name, port_var, path in (("mlflow", "LENS_MLFLOW_PORT", "/health"),
                                 ("prefect", "LENS_PREFECT_PORT", "/api/health")):
        service = svc[name]
        env = {k: resolve(str(v), secrets) for k, v in service["environment"].items()}
        s = built[name] = infra.from_env(env)
        port = s.mlflow_port if name == "mlflow" else s.prefect_port
        published, target = _port_map(service["ports"][0])
        default_port = int(services.ENV_VARS[port_var][0])
        if published != f"127.0.0.1:${{{port_var}:-{default_port}}}":
            out.append(f"compose {name}: published port {published!r} must be "
                       f"127.0.0.1:${{{port_var}:-{default_port}}}")
        if not target == port == default_port:
            out.append(f"compose {name}: container port {target}, {port_var}={port} in its "
                       f"environment and ServiceSettings' default {default_port} must agree")
        if service["command"][:5] != ["python", "-m", "lens.infra", "serve", name]:
            out.append(f"compose {name}: command must be `python -m lens.infra serve {name}` "
                       f"(what `lens services up` runs), got {service['command']}")
        if f"127.0.0.1:{target}{path}" not in " ".join(service["healthcheck"]["test"]):
            out.append(f"compose {name}: healthcheck does not probe port {target}{path}")
        cmd = infra.serve_plan(name, s)
        if cmd[cmd.index("--port") + 1] != str(target) or cmd[cmd.index("--host") + 1] != "0.0.0.0":
            out.append(f"compose {name}: the server would not listen on 0.0.0.0:{target}: {cmd}")
        pg = urlsplit(s.postgres_url)
        if pg.hostname not in svc or pg.port != 5432 or pg.username != (
                svc["postgres"]["environment"]["POSTGRES_USER"]):
            out.append(f"compose {name}: LENS_POSTGRES_URL {s.postgres_url} does not reach the "
                       f"postgres service as its user")
    m = built["mlflow"]
    s3_port = svc["s3"]["command"][svc["s3"]["command"].index("--address") + 1].lstrip(":")
    if m.s3_endpoint_url != f"http://s3:{s3_port}":
        out.append(f"compose mlflow: S3 endpoint {m.s3_endpoint_url} is not the s3 service's "
                   f"port {s3_port}")
    published = f"localhost:{services.ENV_VARS['LENS_MLFLOW_PORT'][0]}"
    for host in (f"mlflow:{m.mlflow_port}", published):
        if host not in m.mlflow_allowed_hosts:
            out.append(f"compose mlflow: allowed hosts {m.mlflow_allowed_hosts} lack {host}")
    worker = svc["worker"]["environment"]
    wants = {"MLFLOW_TRACKING_URI": f"http://mlflow:{m.mlflow_port}",
             "PREFECT_API_URL": f"http://prefect:{built['prefect'].prefect_port}/api",
             "AWS_ENDPOINT_URL": m.s3_endpoint_url, "MLFLOW_TRACKING_USERNAME": m.admin_user,
             "LENS_DVC_REMOTE": f"s3://{m.bucket}/dvc"}
    for key, want in wants.items():
        if worker.get(key) != want:
            out.append(f"compose worker: {key}={worker.get(key)!r}, expected {want!r}")
    pool = svc["worker"]["command"][-1]
    if infra.POOLS.get(pool, ("",))[0] != "process":
        out.append(f"compose worker: pool {pool!r} is not the process pool of infra/prefect")
    return out


# --- Kubernetes --------------------------------------------------------------------------------

def k8s_problems(files: dict[str, list[dict[str, Any]]], job: dict[str, Any]) -> list[str]:
    out: list[str] = []
    docs = [(rel, d) for rel, ds in files.items() for d in ds]
    namespace = job["metadata"]["namespace"]
    by_kind: dict[tuple[str, str], dict[str, Any]] = {}
    for rel, d in docs:
        by_kind[(d["kind"], d["metadata"]["name"])] = d
        if d["metadata"].get("namespace") != namespace:
            out.append(f"{rel}: {d['kind']} {d['metadata']['name']} is in namespace "
                       f"{d['metadata'].get('namespace')!r}, the PyTorchJob in {namespace!r}")
        for text in _strings(d):
            if URL_PASSWORD.search(text):
                out.append(f"{rel}: a URL with a literal password: {text!r}")
    config = by_kind[("ConfigMap", infra.K8S["config"])]["data"]
    out += [f"k8s ConfigMap: {k} is not a lens.services setting (ENV_VARS)"
            for k in config if k not in services.ENV_VARS]
    settings = infra.from_env(config)
    ports = {"lens-mlflow": settings.mlflow_port, "lens-prefect": settings.prefect_port}
    for name, port_var in (("lens-mlflow", "LENS_MLFLOW_PORT"),
                           ("lens-prefect", "LENS_PREFECT_PORT")):
        if ports[name] != int(services.ENV_VARS[port_var][0]):
            out.append(f"k8s ConfigMap: {port_var}={ports[name]} != ServiceSettings' default "
                       f"{services.ENV_VARS[port_var][0]}")
        service = by_kind[("Service", name)]["spec"]["ports"][0]
        if not service["port"] == service["targetPort"] == ports[name]:
            out.append(f"k8s Service {name}: port {service['port']}->{service['targetPort']} "
                       f"!= {port_var}={ports[name]}")
    if f"{infra.K8S['mlflow']}:{settings.mlflow_port}" not in settings.mlflow_allowed_hosts:
        out.append(f"k8s ConfigMap: LENS_MLFLOW_ALLOWED_HOSTS lacks the Service "
                   f"{infra.K8S['mlflow']}:{settings.mlflow_port}")
    for (kind, name), d in by_kind.items():
        if kind != "Deployment":
            continue
        pod = d["spec"]["template"]["spec"]
        box = pod["containers"][0]
        if box["image"] != S.images["mlflow"]:
            out.append(f"k8s {name}: image {box['image']} != ServiceSettings' {S.images['mlflow']}")
        env = box.get("env", [])
        out += env_name_problems(f"k8s {name}", [e["name"] for e in env])
        for e in env:
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if e["name"] in infra.SECRET_VALUED and not ref:
                out.append(f"k8s {name}: {e['name']} must come from a Secret, not a literal")
            if ref and (ref["name"] != infra.K8S["secret"]
                        or ref["key"] not in services.SECRET_ENV_VARS):
                out.append(f"k8s {name}: {e['name']} reads {ref}, not a SECRET_ENV_VARS key "
                           f"of Secret {infra.K8S['secret']}")
        if name in ports:
            served = box["command"][-1]
            if box["command"][:4] != ["python", "-m", "lens.infra", "serve"] or (
                    f"lens-{served}" != name):
                out.append(f"k8s {name}: command must be `python -m lens.infra serve`")
            for where, port in (("containerPort", box["ports"][0]["containerPort"]),
                                ("readinessProbe", box["readinessProbe"]["httpGet"]["port"])):
                if port != ports[name]:
                    out.append(f"k8s {name}: {where} {port} != the ConfigMap's {ports[name]}")
            if box["envFrom"] != [{"configMapRef": {"name": infra.K8S["config"]}}]:
                out.append(f"k8s {name}: must read its settings from {infra.K8S['config']}")
    worker = by_kind[("Deployment", infra.K8S["worker"])]["spec"]["template"]["spec"]
    api = {e["name"]: e.get("value") for e in worker["containers"][0]["env"]}["PREFECT_API_URL"]
    if api != f"http://{infra.K8S['prefect']}:{ports['lens-prefect']}/api":
        out.append(f"k8s worker: PREFECT_API_URL {api} is not the lens-prefect Service")
    if ("ServiceAccount", worker.get("serviceAccountName")) not in by_kind:
        out.append("k8s worker: its service account is not defined")
    pool = worker["containers"][0]["command"][-1]
    if infra.POOLS.get(pool, ("",))[0] != "kubernetes":
        out.append(f"k8s worker: pool {pool!r} is not the Kubernetes pool of infra/prefect")
    return out


# --- work pools vs the PyTorchJob --------------------------------------------------------------

def pool_problems(template: dict[str, Any], job: dict[str, Any],
                  mlflow_port: int) -> list[str]:
    out: list[str] = []
    config = infra.render_template(template)
    manifest = config["job_manifest"]
    pod, master = manifest["spec"]["template"]["spec"], infra.master_pod(job)
    box, ref = pod["containers"][0], master["containers"][0]
    where = "infra/prefect/kubernetes-gpu.json"
    for what, got, want in (
            ("image", box["image"], ref["image"]), ("image", box["image"], S.images["mlflow"]),
            ("namespace", config["namespace"], job["metadata"]["namespace"]),
            ("namespace", manifest["metadata"]["namespace"], job["metadata"]["namespace"]),
            ("GPUs", box["resources"]["limits"]["nvidia.com/gpu"],
             ref["resources"]["limits"]["nvidia.com/gpu"]),
            ("memory", box["resources"]["limits"]["memory"], ref["resources"]["limits"]["memory"]),
            ("volume mounts", box["volumeMounts"], ref["volumeMounts"]),
            ("volumes", pod["volumes"], master["volumes"]),
            ("MLFLOW_TRACKING_URI", config["env"].get("MLFLOW_TRACKING_URI"),
             f"http://{infra.K8S['mlflow']}:{mlflow_port}")):
        if got != want:
            out.append(f"{where}: {what} {got!r} != {want!r} (the PyTorchJob / settings)")
    for e in ref["env"]:
        if config["env"].get(e["name"]) != e["value"]:
            out.append(f"{where}: env {e['name']}={config['env'].get(e['name'])!r}, the "
                       f"PyTorchJob sets {e['value']!r}")
    out += env_name_problems(where, list(config["env"]) + [e["name"] for e in box["env"]])
    for e in box["env"]:
        ref_ = e.get("valueFrom", {}).get("secretKeyRef", {})
        if ref_.get("name") != infra.K8S["secret"] or ref_.get("key") not in (
                services.SECRET_ENV_VARS):
            out.append(f"{where}: {e['name']} must read a SECRET_ENV_VARS key of "
                       f"{infra.K8S['secret']}, got {e}")
    # what Prefect's Kubernetes worker insists on (prefect_kubernetes.worker)
    if box["name"] != "prefect-job" or pod["restartPolicy"] != "Never" or not (
            pod["parallelism"] == pod["completions"] == 1):
        out.append(f"{where}: the Job must keep container 'prefect-job', restartPolicy Never, "
                   f"parallelism and completions 1")
    return out


# --- prefect.yaml ------------------------------------------------------------------------------

def _flow_signature(entrypoint: str) -> tuple[str, list[str], set[str]] | None:
    """(flow name, parameters, required parameters) of ``path:function``, read with ast."""
    path, _, func = entrypoint.partition(":")
    tree = ast.parse((REPO / path).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == func:
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and getattr(deco.func, "id", "") == "flow":
                    name = next(k.value.value for k in deco.keywords if k.arg == "name")
                    args = [a.arg for a in node.args.args]
                    required = set(args[:len(args) - len(node.args.defaults)])
                    return name, args, required
    return None


def prefect_yaml_problems(doc: dict[str, Any], templates: dict[str, dict[str, Any]]) -> list[str]:
    out: list[str] = []
    if doc.get("pull") != [{"lens.infra.project_dir": {}}]:
        out.append("prefect.yaml: the pull step must be lens.infra.project_dir")
    names = [d["name"] for d in doc["deployments"]]
    for d in doc["deployments"]:
        where = f"prefect.yaml deployment {d['name']}"
        if not (REPO / d["entrypoint"].partition(":")[0]).is_file():
            out.append(f"{where}: entrypoint {d['entrypoint']} does not exist")
            continue
        sig = _flow_signature(d["entrypoint"])
        if sig is None:
            out.append(f"{where}: {d['entrypoint']} is not a @flow(name=...) function")
            continue
        _, args, required = sig
        params = set(d.get("parameters", {}))
        if params - set(args):
            out.append(f"{where}: parameters {sorted(params - set(args))} are not arguments "
                       f"of {d['entrypoint']} {args}")
        if required - params:
            out.append(f"{where}: required arguments {sorted(required - params)} have no value")
        pool = d["work_pool"]["name"]
        if pool not in templates:
            out.append(f"{where}: work pool {pool} is not one of infra/prefect's "
                       f"{sorted(templates)}")
            continue
        known = set(templates[pool]["variables"]["properties"])
        extra = set(d["work_pool"].get("job_variables") or {}) - known
        if extra:
            out.append(f"{where}: job variables {sorted(extra)} are not variables of pool {pool}")
    if len(set(names)) != len(names):
        out.append("prefect.yaml: deployment names repeat")
    data = next((d for d in doc["deployments"] if d["entrypoint"].startswith("flows/data.py")),
                None)
    if not data or not any("cron" in s for s in data.get("schedules", [])):
        out.append("prefect.yaml: the data flow's deployment needs a cron schedule")
    return out


# --- loading the committed files ---------------------------------------------------------------

def _load(root: Path = REPO) -> dict[str, Any]:
    infra_dir = root / "infra"
    job = yaml.safe_load((infra_dir / infra.PYTORCHJOB).read_text())
    return {
        "compose": yaml.safe_load((infra_dir / infra.COMPOSE).read_text()),
        "k8s": {f"k8s/{p.name}": [d for d in yaml.safe_load_all(p.read_text()) if d]
                for p in sorted((infra_dir / "k8s").glob("*.yaml"))
                if p.name != Path(infra.PYTORCHJOB).name},
        "job": job,
        "templates": {name: json.loads((infra_dir / rel).read_text())
                      for name, (_, rel) in infra.POOLS.items()},
        "prefect": yaml.safe_load((root / "prefect.yaml").read_text()),
    }


def all_problems(files: dict[str, Any]) -> list[str]:
    mlflow_port = next(d for ds in files["k8s"].values() for d in ds
                       if d["kind"] == "Service" and d["metadata"]["name"] == "lens-mlflow")
    return (compose_problems(files["compose"]) + k8s_problems(files["k8s"], files["job"])
            + pool_problems(files["templates"][infra.GPU_POOL], files["job"],
                            mlflow_port["spec"]["ports"][0]["port"])
            + prefect_yaml_problems(files["prefect"], files["templates"]))


@pytest.fixture(scope="module")
def files() -> dict[str, Any]:
    return _load()


# --- tests -------------------------------------------------------------------------------------

def test_every_infra_file_parses() -> None:
    paths = [*infra.iter_files(), *sorted(INFRA.rglob("*.yml")), *sorted(INFRA.rglob("*.yaml"))]
    assert len(set(paths)) >= 9
    for path in set(paths):
        text = path.read_text()
        docs = [json.loads(text)] if path.suffix == ".json" else [
            d for d in yaml.safe_load_all(text) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_committed_files_are_what_the_settings_render() -> None:
    assert infra.check() == []


def test_files_agree_with_settings_and_code(files) -> None:
    assert all_problems(files) == []


def test_settings_defaults_are_the_env_defaults() -> None:
    """The files render from ServiceSettings(); `lens services` reads ENV_VARS' defaults."""
    assert infra.from_env({"LENS_HOME": str(S.home.parent)}) == S
    for make in (infra.compose_settings, infra.k8s_settings):
        inside = make(S)
        assert infra.from_env(infra.settings_env(inside)) == inside


@pytest.mark.parametrize("edit, expected", [
    (lambda f: f["compose"]["services"]["mlflow"].update(
        ports=["${LENS_MLFLOW_PORT:-5000}:5001"]), "container port 5001"),
    (lambda f: f["compose"]["services"]["prefect"].update(
        ports=["${LENS_PREFECT_PORT:-4300}:4200"]), "published port"),
    (lambda f: f["compose"]["services"]["worker"]["environment"].update(
        MLFLOW_TRACKING_URI="http://mlflow:5001"), "MLFLOW_TRACKING_URI"),
    (lambda f: f["k8s"]["k8s/config.yaml"][0]["data"].update(LENS_MLFLOW_PORT="5001"),
     "LENS_MLFLOW_PORT=5001"),
    (lambda f: f["k8s"]["k8s/mlflow.yaml"][1]["spec"]["ports"][0].update(port=8080),
     "Service lens-mlflow"),
    (lambda f: f["templates"]["lens-gpu"]["variables"]["properties"]["image"].update(
        default="lens-platform:latest"), "image"),
    (lambda f: f["templates"]["lens-gpu"]["variables"]["properties"]["env"]["default"].update(
        DS_ACCELERATOR="cpu"), "DS_ACCELERATOR"),
    (lambda f: f["job"]["metadata"].update(namespace="ml"), "namespace"),
])
def test_a_change_in_one_place_only_is_caught(files, edit, expected) -> None:
    changed = copy.deepcopy(files)
    edit(changed)
    found = all_problems(changed)
    assert any(expected in p for p in found), found


@pytest.mark.parametrize("edit, expected", [
    (lambda f: f["compose"]["services"]["postgres"]["environment"].update(
        POSTGRES_PASSWORD="hunter2hunter2"), "POSTGRES_PASSWORD must be a required reference"),
    (lambda f: f["compose"]["services"]["mlflow"]["environment"].update(
        LENS_POSTGRES_URL="postgresql://postgres:pw@postgres:5432"), "literal password"),
    (lambda f: f["compose"]["services"]["mlflow"]["environment"].update(
        PGPASSWORD="${PGPASSWORD:-postgres}"), "secret PGPASSWORD must be required"),
    (lambda f: f["compose"]["services"]["mlflow"]["environment"].update(
        LENS_MLFLOW_PROT="5000"), "LENS_MLFLOW_PROT is read by nothing"),
    (lambda f: f["compose"]["services"]["mlflow"].update(
        image="${LENS_IMAGE:-lens}:${LENS_IMAGE_TAG:-0.1.0}"), "must default to"),
    (lambda f: f["k8s"]["k8s/mlflow.yaml"][0]["spec"]["template"]["spec"]["containers"][0][
        "env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}), "from a Secret"),
    (lambda f: f["prefect"]["deployments"][0]["parameters"].update(recipes="tiny"),
     "not arguments"),
    (lambda f: f["prefect"]["deployments"][3]["parameters"].pop("name"),
     "required arguments ['name']"),
    (lambda f: f["prefect"]["deployments"][1]["work_pool"]["job_variables"].update(gpu=8),
     "job variables ['gpu']"),
])
def test_secrets_names_and_parameters_are_checked(files, edit, expected) -> None:
    changed = copy.deepcopy(files)
    edit(changed)
    found = all_problems(changed)
    assert any(expected in p for p in found), found


def test_gpu_pool_runs_the_pytorchjob_pod_that_lens_train_render_writes(tmp_path) -> None:
    """The CLI, run as users run it, renders the committed PyTorchJob; the pool's Job (as
    Prefect fills its template) has that pod's image, namespace, env, GPUs and volumes."""
    out = tmp_path / "job"
    subprocess.run([str(BIN / "lens"), "train", "render", infra.GPU_RECIPE, "--target", "k8s",
                    "--out", str(out), "--set", f"launch.image={S.images['mlflow']}"],
                   check=True, capture_output=True, cwd=REPO,
                   env={**os.environ, "LENS_HOME": str(tmp_path / "home")})
    (rendered,) = out.glob("pretrain-*.yaml")
    assert rendered.read_text() == (INFRA / infra.PYTORCHJOB).read_text()
    job = yaml.safe_load(rendered.read_text())
    template = json.loads((INFRA / infra.POOLS[infra.GPU_POOL][1]).read_text())
    assert pool_problems(template, job, S.mlflow_port) == []
    config = infra.render_template(template, {"image": "other:1", "gpus": 4})
    box = config["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert box["image"] == "other:1" and box["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert {"DS_ACCELERATOR": "cuda", "HF_HUB_OFFLINE": "1"}.items() <= config["env"].items()


def test_process_pool_is_prefects_own_template() -> None:
    from prefect.workers.process import ProcessWorker

    committed = json.loads((INFRA / infra.POOLS[infra.PROCESS_POOL][1]).read_text())
    assert committed == ProcessWorker.get_default_base_job_template()


def test_project_dir_pull_step(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LENS_PROJECT_DIR", raising=False)
    assert infra.project_dir() == {"directory": str(REPO)} and Path.cwd() == REPO
    monkeypatch.setenv("LENS_PROJECT_DIR", str(tmp_path))
    with pytest.raises(infra.InfraError, match="LENS_PROJECT_DIR"):
        infra.project_dir()


def test_serve_runs_what_lens_services_up_runs(tmp_path) -> None:
    env = {k: resolve(str(v)) for k, v in
           yaml.safe_load((INFRA / infra.COMPOSE).read_text())["services"]["mlflow"][
               "environment"].items()} | {"LENS_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "lens.infra", "serve", "mlflow", "--print"],
                          env={**os.environ, **env}, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    cmd = json.loads(proc.stdout.splitlines()[-1])
    assert cmd == services.mlflow_command(infra.from_env(env))
    assert cmd[cmd.index("--port") + 1] == "5000" and "--app-name" in cmd


def _stop(proc: subprocess.Popen, settings: services.ServiceSettings) -> None:
    """Stop a `serve` entrypoint's process group and drop the databases it created."""
    from tests.services_fixtures import _stop_group, drop_databases

    _stop_group(proc)
    drop_databases(settings.databases)


@pytest.mark.slow
def test_serve_prefect_entrypoint_starts_the_server(tmp_path) -> None:
    """The container entrypoint for real: databases created, the server up on PostgreSQL."""
    from tests.services_fixtures import free_port

    tag = os.urandom(4).hex()
    env = {k: v for k, v in os.environ.items() if k not in services.CLIENT_ENV_VARS} | {
        "LENS_HOME": str(tmp_path / "home"), "LENS_PREFECT_PORT": str(free_port()),
        "LENS_PREFECT_DB": f"lens_infra_{tag}_prefect", "LENS_MLFLOW_DB": f"lens_infra_{tag}_ml",
        "LENS_MLFLOW_AUTH_DB": f"lens_infra_{tag}_auth"}
    settings = infra.from_env({k: v for k, v in env.items() if k in services.ENV_VARS})
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lens.infra", "serve", "prefect"], env=env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{settings.prefect_api_url}/health", timeout=2):
                    break
            except (OSError, urllib.error.HTTPError):
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
                assert time.monotonic() < deadline, "prefect server did not get healthy"
                time.sleep(0.5)
        print(f"serve prefect healthy after {time.perf_counter() - started:.1f} s")
        assert proc.poll() is None  # exec'd: the entrypoint's process is the server
    finally:
        _stop(proc, settings)


@pytest.mark.slow
def test_serve_mlflow_entrypoint_as_compose_runs_it(tmp_path, moto_s3) -> None:  # noqa: F811
    """`serve mlflow --create-bucket` on moto and PostgreSQL: the bucket is made, the
    databases created, and the server answers with basic auth on."""
    import base64

    from tests.services_fixtures import free_port

    tag = os.urandom(4).hex()
    bucket = f"lens-infra-{tag}"
    password = os.urandom(12).hex()
    env = {k: v for k, v in os.environ.items() if k not in services.CLIENT_ENV_VARS} | (
        moto_s3.env) | {
        "LENS_HOME": str(tmp_path / "home"), "LENS_MLFLOW_PORT": str(free_port()),
        "LENS_MLFLOW_ARTIFACTS": f"s3://{bucket}/artifacts",
        "LENS_PREFECT_DB": f"lens_infra_{tag}_prefect", "LENS_MLFLOW_DB": f"lens_infra_{tag}_ml",
        "LENS_MLFLOW_AUTH_DB": f"lens_infra_{tag}_auth", "LENS_MLFLOW_ADMIN_PASSWORD": password}
    settings = infra.from_env({k: v for k, v in env.items() if k in services.ENV_VARS})
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lens.infra", "serve", "mlflow",
                             "--create-bucket"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def get(path: str, auth: bool) -> int:
        headers = {"Authorization": "Basic " + base64.b64encode(
            f"{settings.admin_user}:{password}".encode()).decode()} if auth else {}
        req = urllib.request.Request(settings.mlflow_url + path, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if get("/health", False) == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not get healthy"
            time.sleep(0.5)
        print(f"serve mlflow healthy after {time.perf_counter() - started:.1f} s")
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert get(search, auth=False) == 401 and get(search, auth=True) == 200
        assert bucket in [b["Name"] for b in moto_s3.client().list_buckets()["Buckets"]]
    finally:
        _stop(proc, settings)


def test_the_recipes_default_image_is_the_settings_image() -> None:
    from lens_model.recipe import LaunchSection

    assert LaunchSection().image == S.images["mlflow"]


def test_compose_builds_the_lens_image_from_the_dockerfile() -> None:
    """Every service running the project image builds it from infra/Dockerfile at the repo
    root; the Dockerfile installs torch from its index first, then this project."""
    doc = yaml.safe_load((REPO / "infra" / "docker-compose.yml").read_text())
    lens = {n: svc for n, svc in doc["services"].items() if "LENS_IMAGE" in svc["image"]}
    assert set(lens) == {"mlflow", "prefect", "worker"}
    for svc in lens.values():
        assert (REPO / "infra" / svc["build"]["context"]).resolve() == REPO.resolve()
        assert svc["build"]["dockerfile"] == infra.DOCKERFILE
    text = (REPO / infra.DOCKERFILE).read_text()
    steps = ('"torch==', "COPY . .", "pip install --no-cache-dir -e")
    assert [text.index(x) for x in steps] == sorted(text.index(x) for x in steps)
