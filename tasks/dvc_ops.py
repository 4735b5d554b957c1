"""DVC operations through DVC's own CLI, serialised: parallel DVC commands fail on its lock."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import yaml

from lens_model import atomic, defaults
from lens_model.recipe import Recipe

RAW, DATASET = "data/raw", "data/dataset"
STAGES = ("prepare", "validate")
# Prefect global concurrency limit that serialises DVC commands across workers and machines
DVC_LIMIT = "dvc"


class DvcError(RuntimeError):
    """A DVC command failed; the message holds the command, the repo and DVC's own words."""


def repo_root(repo: str | Path | None = None) -> Path:
    """The DVC repo: ``repo``, else ``$LENS_DVC_REPO``, else the working directory."""
    root = Path(repo or os.environ.get("LENS_DVC_REPO") or ".").resolve()
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        raise DvcError(f"{root} is not a DVC repo with a dvc.yaml: run from the project "
                       f"checkout, pass --repo, or set LENS_DVC_REPO")
    return root


def ensure_limit(name: str = DVC_LIMIT, slots: int = 1) -> None:
    """Create Prefect's global concurrency limit ``name`` if the server has none; an existing
    one (an operator's choice of slots, or a deactivated limit) is left as it is."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=slots))
            except ObjectAlreadyExists:  # another worker created it first
                pass


def _dvc_slot() -> Any:
    """The ``dvc`` slot inside a Prefect run; outside one there is no server to ask (and
    starting an ephemeral one for a DVC call would cost seconds), so the file lock alone rules.
    The limit is created on first use, so the embedded ephemeral server needs no setup."""
    from prefect.concurrency.sync import concurrency  # here: the CLI imports this module
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return nullcontext()
    ensure_limit()
    return concurrency(DVC_LIMIT, occupy=1)


@contextmanager
def serialized(root: Path) -> Iterator[None]:
    """Hold the locks that keep DVC commands from running at once: the Prefect global
    concurrency limit ``dvc`` (one slot, across machines) and this repo's file lock."""
    with _dvc_slot(), atomic.file_lock(root / ".dvc" / "tmp" / "lens-serial.lock"):
        yield


def dvc(root: Path, *args: str, check: bool = True) -> str:
    """Run ``dvc ARGS`` in ``root`` (the caller holds :func:`serialized`)."""
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0 and check:
        raise DvcError(f"`dvc {' '.join(args)}` failed in {root} (exit {proc.returncode}):\n"
                       f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def ensure_remote(root: Path) -> str:
    """The default remote's URL; with none configured, add the embedded default (local)."""
    name = dvc(root, "remote", "default", check=False).strip()  # exits 1 when none is set
    if not name or " " in name:  # DVC's "No default remote set"
        url = defaults.dvc_remote_url()
        dvc(root, "remote", "add", "--local", "--default", "--force", "lens", url)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if url.startswith("s3://") and endpoint:
            dvc(root, "remote", "modify", "--local", "lens", "endpointurl", endpoint)
        name = "lens"
    # `dvc config` prints the merged value; `dvc remote list` wraps long lines.
    url = dvc(root, "config", f"remote.{name}.url", check=False).strip()
    if not url or "\n" in url:
        raise DvcError(f"default DVC remote {name!r} has no url; fix it with `dvc remote add "
                       f"--default {name} URL` or remove it from .dvc/config")
    return url


def write_params(root: Path, recipe: Recipe) -> Path:
    """Write the resolved recipe to params.yaml, which dvc.yaml's stages read."""
    path = root / "params.yaml"
    text = recipe.to_yaml()
    if not path.exists() or path.read_text() != text:
        atomic.write_text(path, text)
    return path



def lock_hashes(root: Path) -> dict[str, str]:
    """``{out path: md5}`` of the data stages, from dvc.lock."""
    lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    out: dict[str, str] = {}
    for stage in STAGES:
        for entry in lock.get("stages", {}).get(stage, {}).get("outs", []):
            out[entry["path"]] = entry["md5"]
    return out


def commit_and_push(root: Path) -> dict[str, Any]:
    """Record the data stages' outputs in dvc.lock and the cache, then push to the remote."""
    with serialized(root):
        remote = ensure_remote(root)
        dvc(root, "commit", "--force", *STAGES)
        dvc(root, "push", *STAGES)
        hashes = lock_hashes(root)
    dataset = hashes.get(DATASET)
    if not dataset:
        raise DvcError(f"dvc.lock in {root} records no output {DATASET}; check dvc.yaml")
    return {"dvc_hash": dataset.removesuffix(".dir"), "raw_dvc_hash":
            hashes.get(RAW, "").removesuffix(".dir"), "remote": remote}
