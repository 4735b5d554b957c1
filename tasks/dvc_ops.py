"""DVC operations through DVC's own CLI, serialised: parallel DVC commands fail on its lock."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from lens import defaults
from lens_model import atomic
from lens_model.recipe import Recipe

RAW, DATASET = "data/raw", "data/dataset"
STAGES = ("prepare", "validate")


class DvcError(RuntimeError):
    """A DVC command failed; the message holds the command, the repo and DVC's own words."""


def repo_root(repo: str | Path | None = None) -> Path:
    """The DVC repo: ``repo``, else ``$LENS_DVC_REPO``, else the working directory."""
    root = Path(repo or os.environ.get("LENS_DVC_REPO") or ".").resolve()
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        raise DvcError(f"{root} is not a DVC repo with a dvc.yaml: run from the project "
                       f"checkout, pass --repo, or set LENS_DVC_REPO")
    return root


@contextmanager
def serialized(root: Path) -> Iterator[None]:
    """Hold the repo-wide lock that keeps DVC commands from running at once."""
    with atomic.file_lock(root / ".dvc" / "tmp" / "lens-serial.lock"):
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
    for line in dvc(root, "remote", "list").splitlines():
        parts = line.split()
        if parts and parts[0] == name:
            return parts[1]
    raise DvcError(f"default DVC remote {name!r} is not in `dvc remote list`; fix .dvc/config")


def write_params(root: Path, recipe: Recipe) -> Path:
    """Write the resolved recipe to params.yaml, which dvc.yaml's stages read."""
    path = root / "params.yaml"
    text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    if not path.exists() or path.read_text() != text:
        atomic.write_text(path, text)
    return path


def read_params(path: str | Path) -> Recipe:
    return Recipe.model_validate(yaml.safe_load(Path(path).read_text()))


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
