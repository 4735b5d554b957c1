"""Security: no secret from the environment lands in tracking, and weights load from
safetensors only (a pickle offered as a model, text encoder, VAE or training checkpoint is
refused before anything unpickles it)."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# --- the canary scan ---------------------------------------------------------------------------

# Secrets a real deployment holds in its environment; each test run gives each its own value.
# (MLFLOW_TRACKING_USERNAME is no secret: MLflow records it as the run's user, by design.)
SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
               "LENS_MLFLOW_ADMIN_PASSWORD", "LENS_REASONER_API_TOKEN", "OPENAI_API_KEY",
               "HF_TOKEN", "LENS_CHECKPOINT_KEY", "PGPASSWORD")


def canaries() -> dict[str, str]:
    """One unique, greppable value per secret variable."""
    run = uuid.uuid4().hex[:12]
    return {var: f"CANARY{run}{var.replace('_', '')}" for var in SECRET_VARS}


def encodings(secret: str) -> list[bytes]:
    """The byte strings that betray ``secret``: as is, and the cores of its base64 (standard
    and URL-safe) at each of the three alignments it can start at in an encoded stream."""
    raw = secret.encode()
    found = [raw]
    for skip in range(3):
        part = raw[skip:]
        part = part[:len(part) // 3 * 3]
        found += [base64.b64encode(part), base64.urlsafe_b64encode(part)]
    return found


def _members(name: str, data: bytes, depth: int = 0) -> Iterator[tuple[str, bytes]]:
    """``data`` and, for containers (zip, including torch files; gzip; tar; Parquet), every
    member decoded, so a compressed copy of a secret is found too."""
    yield name, data
    if depth > 3:
        return
    inner: list[tuple[str, bytes]] = []
    try:
        if data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                inner = [(f"{name}!{m}", zf.read(m)) for m in zf.namelist()]
        elif data[:2] == b"\x1f\x8b":
            inner = [(f"{name}!gunzip", gzip.decompress(data))]
        elif data[:4] == b"PAR1":
            import pyarrow.parquet as pq

            table = pq.read_table(io.BytesIO(data))
            inner = [(f"{name}!rows", json.dumps(table.to_pylist(), default=repr).encode())]
        elif len(data) > 262 and data[257:262] == b"ustar":
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                inner = [(f"{name}!{m.name}", tf.extractfile(m).read())
                         for m in tf.getmembers() if m.isfile()]
    except Exception as exc:  # a damaged container is still scanned raw, above
        inner = [(f"{name}!undecodable", repr(exc).encode())]
    for sub_name, sub in inner:
        yield from _members(sub_name, sub, depth + 1)


def scan_bytes(where: str, data: bytes, secrets: dict[str, str]) -> list[str]:
    """``where: VAR`` for each secret whose value (or its base64) is in ``data``."""
    hits = []
    for name, blob in _members(where, data):
        for var, value in secrets.items():
            if any(e in blob for e in encodings(value)):
                hits.append(f"{name}: {var}")
    return hits


def scan_tree(root: Path, secrets: dict[str, str]) -> tuple[list[str], int]:
    """Hits under ``root`` (every file, links not followed) and the number of files read."""
    hits, n = [], 0
    for folder, _, files in os.walk(root):
        for fname in files:
            path = Path(folder) / fname
            if path.is_symlink() or not path.is_file():
                continue
            n += 1
            hits += scan_bytes(str(path), path.read_bytes(), secrets)
    return hits, n


def sqlite_rows(db: Path) -> Iterator[tuple[str, str]]:
    """``(table, row as text)`` for every row of every table of a SQLite database."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in con.execute(f'SELECT * FROM "{table}"'):
                yield table, repr(row)
    finally:
        con.close()


def test_the_scan_finds_a_secret_raw_compressed_or_base64(tmp_path: Path) -> None:
    """The scanner itself: a canary hidden in a gzip, a zip, a Parquet table or base64 text is
    found; clean bytes are not flagged."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    secrets = {"HF_TOKEN": canaries()["HF_TOKEN"]}
    value = secrets["HF_TOKEN"]
    (tmp_path / "a.gz").write_bytes(gzip.compress(f"x={value}".encode()))
    with zipfile.ZipFile(tmp_path / "b.pt", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", f"..{value}..")
    pq.write_table(pa.table({"c": [f"k {value}"]}), tmp_path / "c.parquet", compression="zstd")
    for skip in range(3):
        blob = base64.b64encode(b"p" * skip + value.encode() + b"q")
        (tmp_path / f"d{skip}.json").write_text(json.dumps({"result": blob.decode()}))
    (tmp_path / "clean.txt").write_text("nothing here")
    hits, n = scan_tree(tmp_path, secrets)
    assert n == 7 and {h.split("!")[0].split(":")[0] for h in hits} == {
        str(tmp_path / f) for f in ("a.gz", "b.pt", "c.parquet", "d0.json", "d1.json", "d2.json")}


# --- the redaction helper ----------------------------------------------------------------------

def test_secret_names_are_told_from_ordinary_keys() -> None:
    from lens_model.recipe import load_recipe
    from lens_model.secrets import is_secret_name

    for name in (*SECRET_VARS, "PREFECT_API_KEY", "reasoner.api_key",
                 "DATABASE_PASSWORD", "GITHUB_TOKEN"):
        assert is_secret_name(name), name
    for name in ("token_px", "max_tokens", "tokenizer", "MLFLOW_TRACKING_USERNAME", "HOME",
                 "lens.recipe_hash", "SSH_AUTH_SOCK"):
        assert not is_secret_name(name), name
    for recipe in ("tiny", "toy", "lens-3.8b"):  # no recipe value is masked as a secret
        assert not [k for k in load_recipe(recipe).flat() if is_secret_name(k)]


def test_redact_masks_env_secrets_uri_passwords_and_secret_keys() -> None:
    from lens_model.secrets import MASK, redact, redact_mapping

    env = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG", "HF_TOKEN": "hf_abcdefgh",
           "LENS_FLAG_TOKEN": "1", "HOME": "/home/lens"}
    text = ("key wJalrXUtnFEMI/K7MDENG in postgresql://lens:pa55word@db:5432/mlflow, "
            "hf_abcdefgh; http://host:8080/a@b and /home/lens stay")
    assert redact(text, env) == (f"key {MASK} in postgresql://lens:{MASK}@db:5432/mlflow, "
                                 f"{MASK}; http://host:8080/a@b and /home/lens stay")
    tags = redact_mapping({"lens.api_key": "x", "db": "mysql://u:pw@h/d", "steps": 4,
                           "note": "token 1 stays"}, env)
    assert tags == {"lens.api_key": MASK, "db": f"mysql://u:{MASK}@h/d", "steps": "4",
                    "note": "token 1 stays"}


def test_lineage_tags_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret that reached a tag value (here, through the recipe's name) is masked."""
    from lens_model.recipe import load_recipe
    from tasks import tracking

    secret = canaries()["OPENAI_API_KEY"]
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    recipe = load_recipe("tiny").model_copy(update={"name": f"tiny-{secret}"})
    tags = tracking.lineage(recipe, "d" * 32, cwd=REPO)
    assert tags["lens.recipe"] == "tiny-***" and tags["lens.dvc_hash"] == "d" * 32
    assert secret not in json.dumps(tags)


def test_dvc_remote_setup_writes_no_credentials(dvc_repo: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials reach DVC from the environment or instance roles only: setting up an S3
    remote (with a custom endpoint) writes its URL and endpoint, never the keys."""
    from tasks import dvc_ops

    secrets = canaries()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(var, secrets[var])
    monkeypatch.setenv("LENS_DVC_REMOTE", "s3://lens-data/dvc")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5999")
    assert dvc_ops.ensure_remote(dvc_repo) == "s3://lens-data/dvc"
    configs = list((dvc_repo / ".dvc").glob("config*"))
    text = "\n".join(p.read_text() for p in configs)
    assert "s3://lens-data/dvc" in text and "http://127.0.0.1:5999" in text
    assert not [h for p in configs for h in scan_bytes(str(p), p.read_bytes(), secrets)]
    for option in ("access_key_id", "secret_access_key", "session_token", "credentialpath"):
        assert option not in text


# --- safetensors only -------------------------------------------------------------------------

class _Boom:
    """Unpickling this writes a file: a pickle that runs code, as an attacker's would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').write('unpickled')",)


def evil_pickle(path: Path, marker: Path) -> Path:
    """A torch.save file (what a .bin/.pt/.ckpt holds) that writes ``marker`` when loaded."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": _Boom(marker)}, path)
    return path


def test_the_evil_pickle_does_run_code_when_unpickled(tmp_path: Path) -> None:
    """The bait is real: torch.load(weights_only=False), what DeepSpeed's resume calls, runs it."""
    import torch

    marker = tmp_path / "ran"
    torch.load(evil_pickle(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.read_text() == "unpickled"


def _minilm_copy(dest: Path, weights: bool) -> Path:
    """MiniLM's config and tokenizer files, with (or without) its safetensors weights."""
    from lens_model.data.tokens import minilm_dir

    dest.mkdir()
    for f in minilm_dir().iterdir():
        if f.is_file() and (weights or not f.name.endswith(".safetensors")):
            shutil.copy(f, dest / f.name)
    return dest


def test_text_encoder_refuses_pickle_weights(tmp_path: Path) -> None:
    from lens_model.safe_load import UnsafeWeightsError
    from lens_model.text_encoder import LanguageEncoder

    marker = tmp_path / "ran"
    folder = _minilm_copy(tmp_path / "lm", weights=False)
    evil_pickle(folder / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeWeightsError, match=r"pytorch_model\.bin.*safetensors only.*Fix"):
        LanguageEncoder.from_spec(str(folder), [1, 2], 16, 32)
    for offered in (folder / "pytorch_model.bin", evil_pickle(tmp_path / "lm.pt", marker)):
        with pytest.raises(UnsafeWeightsError, match=f"refusing {offered}"):
            LanguageEncoder.from_spec(str(offered), [1, 2], 16, 32)
    assert not marker.exists()


def test_text_encoder_reads_safetensors_beside_a_pickle(tmp_path: Path) -> None:
    """A Hugging Face download often ships pytorch_model.bin beside model.safetensors: the
    safetensors load, the pickle is never opened."""
    from lens_model.text_encoder import LanguageEncoder

    marker = tmp_path / "ran"
    folder = _minilm_copy(tmp_path / "lm", weights=True)
    evil_pickle(folder / "pytorch_model.bin", marker)
    enc = LanguageEncoder.from_spec(str(folder), [1, 2], 16, 32)
    assert enc.hidden(["a red circle"])[1].any() and not marker.exists()
    reference = LanguageEncoder.from_spec("minilm", [1, 2], 16, 32)
    assert next(enc.lm.parameters()).equal(next(reference.lm.parameters()))
    assert enc.identity() == reference.identity()  # the unread pickle is no part of the key


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LensPipeline saved by save_pretrained (safetensors only), around MiniLM."""
    import torch

    from lens_model.pipeline import LensPipeline, make_scheduler
    from lens_model.text_encoder import LanguageEncoder
    from lens_model.transformer import LensTransformer2DModel
    from lens_model.vae import SemanticVAE

    torch.manual_seed(0)
    enc = LanguageEncoder.from_spec("minilm", [3, 6], 32, 32)
    vae = SemanticVAE.tiny(latent_channels=4, downsample=2, width=8)
    transformer = LensTransformer2DModel(depth=1, width=32, heads=2, mlp_hidden=64,
                                         in_channels=4, axes_dims=(4, 6, 6))
    pipe = LensPipeline(transformer=transformer, vae=vae.model, text_encoder=enc.lm,
                        tokenizer=enc.tokenizer, connector=enc.connector,
                        scheduler=make_scheduler(), layers=[3, 6], max_length=32)
    path = tmp_path_factory.mktemp("pipeline") / "pipe"
    pipe.save_pretrained(path)
    return path


def _with_pickle(saved: Path, dest: Path, marker: Path, replace: str) -> Path:
    """A copy of a saved pipeline whose ``replace`` safetensors file became a pickle."""
    shutil.copytree(saved, dest)
    target = dest / replace
    target.unlink()
    evil_pickle(target.with_suffix(".bin"), marker)
    return dest


def test_pipeline_refuses_pickle_weights(saved_pipeline: Path, tmp_path: Path) -> None:
    from lens_model.pipeline import LensPipeline, load_pipeline
    from lens_model.safe_load import UnsafeWeightsError

    marker = tmp_path / "ran"
    assert LensPipeline.from_pretrained(str(saved_pipeline), local_files_only=True)
    for i, part in enumerate(("transformer/diffusion_pytorch_model.safetensors",
                              "text_encoder/model.safetensors")):
        bad = _with_pickle(saved_pipeline, tmp_path / f"bad{i}", marker, part)
        pickle = str(bad / Path(part).with_suffix(".bin"))
        with pytest.raises(UnsafeWeightsError, match=f"refusing {pickle}.*safetensors only"):
            LensPipeline.from_pretrained(str(bad), local_files_only=True)
        with pytest.raises(UnsafeWeightsError, match=f"refusing {pickle}"):
            load_pipeline(bad)  # what `lens generate --model DIR` and evaluation call
    stray = tmp_path / "stray"  # a pickle beside intact safetensors: never written by us
    shutil.copytree(saved_pipeline, stray)
    evil_pickle(stray / "transformer" / "extra.ckpt", marker)
    with pytest.raises(UnsafeWeightsError, match="extra.ckpt.*which Lens never writes"):
        LensPipeline.from_pretrained(str(stray), local_files_only=True)
    with pytest.raises(ValueError, match="safetensors only"):
        LensPipeline.from_pretrained(str(saved_pipeline), use_safetensors=False)
    checkpoint = evil_pickle(tmp_path / "model.ckpt", marker)
    with pytest.raises(UnsafeWeightsError, match="pickle file passed as the model"):
        load_pipeline(checkpoint)
    assert not marker.exists()


def test_pyfunc_model_refuses_pickle_weights(saved_pipeline: Path, tmp_path: Path) -> None:
    """The registered pyfunc (models from code, no pickled Python model): its artifact
    pipeline loads from safetensors; one with a pickle in it is refused."""
    import mlflow
    from lens_model.safe_load import UnsafeWeightsError

    marker = tmp_path / "ran"
    pyfunc = str(REPO / "tasks" / "lens_pyfunc.py")
    good, bad = tmp_path / "good", tmp_path / "bad"
    for dest in (good, bad):
        mlflow.pyfunc.save_model(str(dest), python_model=pyfunc, pip_requirements=[],
                                 artifacts={"pipeline": str(saved_pipeline)})
    assert not [p for p in good.rglob("*") if p.suffix in (".pkl", ".pickle", ".bin")]
    assert mlflow.pyfunc.load_model(str(good)).unwrap_python_model().pipe is not None
    weights = next((bad / "artifacts").rglob("diffusion_pytorch_model.safetensors"))
    weights.unlink()
    evil_pickle(weights.with_suffix(".bin"), marker)
    with pytest.raises(UnsafeWeightsError, match="diffusion_pytorch_model.bin"):
        mlflow.pyfunc.load_model(str(bad))
    assert not marker.exists()


def test_training_final_folder_refuses_pickles(saved_pipeline: Path, tmp_path: Path) -> None:
    """A run's final/ (lens.json + transformer + connector) and the VAE folder it names."""
    from lens_model.pipeline import LensPipeline
    from lens_model.safe_load import UnsafeWeightsError

    marker = tmp_path / "ran"
    final, vae = tmp_path / "run" / "final", tmp_path / "vae"
    shutil.copytree(saved_pipeline / "transformer", final / "transformer")
    shutil.copytree(saved_pipeline / "vae", vae)
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(saved_pipeline / "connector" / "diffusion_pytorch_model.safetensors")),
              str(final / "connector.safetensors"))
    (final / "lens.json").write_text(json.dumps({
        "vae": str(vae), "text_encoder": {"path": "minilm", "layers": [3, 6], "max_length": 32},
        "step": 1}))
    assert LensPipeline.from_training(final).transformer is not None
    (vae / "diffusion_pytorch_model.safetensors").rename(tmp_path / "vae.safetensors")
    evil_pickle(vae / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(UnsafeWeightsError, match="only weights are pickle files"):
        LensPipeline.from_training(final)
    (tmp_path / "vae.safetensors").rename(vae / "diffusion_pytorch_model.safetensors")
    evil_pickle(final / "transformer" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(UnsafeWeightsError, match="final/ folder.*diffusion_pytorch_model.bin"):
        LensPipeline.from_training(final)
    assert not marker.exists()


def test_vae_by_path_refuses_a_pickle_only_folder(saved_pipeline: Path, tmp_path: Path) -> None:
    import torch

    from lens_model.vae import SemanticVAE

    vae = tmp_path / "vae"
    shutil.copytree(saved_pipeline / "vae", vae)
    weights = vae / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(weights)), vae / "diffusion_pytorch_model.bin")  # benign content
    weights.unlink()
    with pytest.raises(ValueError, match="safetensors"):
        SemanticVAE.from_pretrained(vae)


# --- training checkpoints: only what the trainer wrote resumes ----------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A DeepSpeed trainer (CPU) that saved checkpoints at steps 2 and 4."""
    from tests.ds_worker import run

    ckpt = tmp_path_factory.mktemp("ckpt")
    trainer, batches, _ = run(str(ckpt), 4)
    return {"trainer": trainer, "batches": batches, "ckpt": ckpt}


def _copy(trained: dict, dest: Path) -> Path:
    """A copy of the newest checkpoint, as its own checkpoint folder ``dest/step-00000004``."""
    from lens_model.train import checkpoint

    src = checkpoint.latest(trained["ckpt"])
    shutil.copytree(src, dest / src.name, symlinks=True)
    return dest / src.name


def _load(trained: dict, path: Path) -> object:
    from lens_model.train import checkpoint

    return checkpoint.load(path, trained["trainer"].engine, trained["trainer"].ema)


def test_checkpoint_manifest_lists_every_file(trained: dict) -> None:
    from lens_model.train import checkpoint

    path = checkpoint.latest(trained["ckpt"])
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    on_disk = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                     if p.is_file() and p.name != checkpoint.MANIFEST)
    assert sorted(manifest["files"]) == on_disk and "hmac" not in manifest
    assert "deepspeed/mp_rank_00_model_states.pt" in on_disk and checkpoint.META in on_disk
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == checkpoint.sha256_file(path / name)


def _swap_model_states(path: Path, marker: Path) -> None:
    states = path / "deepspeed" / "mp_rank_00_model_states.pt"
    states.unlink()
    evil_pickle(states, marker)


def _same_size_flip(path: Path, marker: Path) -> None:
    states = path / "deepspeed" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 1
    states.write_bytes(bytes(data))


def _symlink(path: Path, marker: Path) -> None:
    states = path / "deepspeed" / "mp_rank_00_model_states.pt"
    target = evil_pickle(path.parent / "elsewhere.pt", marker)
    states.unlink()
    states.symlink_to(target)


TAMPERING = {
    "replaced": (_swap_model_states, r"mp_rank_00_model_states\.pt has changed"),
    "flipped": (_same_size_flip, r"mp_rank_00_model_states\.pt has changed since.*SHA-256"),
    "stray": (lambda p, m: evil_pickle(p / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_"
                                           "states.pt", m), "a stray pickle file not in"),
    "stray-top": (lambda p, m: evil_pickle(p / "resume.ckpt", m), "resume.ckpt is a stray pickle"),
    "symlink": (_symlink, "is a symlink"),
    "no-manifest": (lambda p, m: (p / "manifest.json").unlink(), "has no manifest.json"),
    "missing": (lambda p, m: (p / "ema.safetensors").unlink(), "ema.safetensors is listed"),
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_a_tampered_checkpoint_is_refused_before_deepspeed_reads_it(
        trained: dict, tmp_path: Path, how: str) -> None:
    from lens_model.train.checkpoint import UntrustedCheckpoint

    marker = tmp_path / "ran"
    path = _copy(trained, tmp_path / "ckpt")
    tamper, message = TAMPERING[how]
    tamper(path, marker)
    with pytest.raises(UntrustedCheckpoint, match=message) as err:
        _load(trained, path)
    assert f"refusing to resume from {path}" in str(err.value) and "Fix: " in str(err.value)
    assert not marker.exists()


def test_resume_refuses_a_replaced_file_and_loads_an_intact_copy(trained: dict,
                                                                tmp_path: Path) -> None:
    """Through the trainer's own resume (Trainer.fit -> restore -> checkpoint.load)."""
    from lens_model.train.checkpoint import UntrustedCheckpoint
    from tests.ds_worker import run

    good = _copy(trained, tmp_path / "good")
    trainer, _, log = run(str(good.parent), 6)
    assert trainer.resumed_from == good and [m["step"] for m in log] == [5, 6]
    marker = tmp_path / "ran"
    bad = _copy(trained, tmp_path / "bad")
    _swap_model_states(bad, marker)
    with pytest.raises(UntrustedCheckpoint, match="mp_rank_00_model_states.pt"):
        run(str(bad.parent), 6)
    assert not marker.exists()


def test_signed_checkpoints_need_the_key_and_catch_a_rewritten_manifest(
        trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With LENS_CHECKPOINT_KEY, someone who swaps a file and rewrites the manifest to match
    is caught; the key is never written into the checkpoint."""
    from lens_model.train import checkpoint
    from lens_model.train.checkpoint import RngState, UntrustedCheckpoint

    key = canaries()["LENS_CHECKPOINT_KEY"]
    monkeypatch.setenv(checkpoint.KEY_ENV, key)
    t = trained["trainer"]
    path = checkpoint.save(tmp_path / "signed", 4, t.engine, t.ema,
                           trained["batches"].state_dict(), {"train": RngState.capture()}, 2)
    assert not scan_tree(path, {"key": key})[0]
    assert _load(trained, path).step == 4  # the right key: it loads
    marker = tmp_path / "ran"
    _swap_model_states(path, marker)
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    states = "deepspeed/mp_rank_00_model_states.pt"
    manifest["files"][states] = {"sha256": checkpoint.sha256_file(path / states),
                                 "bytes": (path / states).stat().st_size}
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))  # a consistent forgery
    with pytest.raises(UntrustedCheckpoint, match="signature of manifest.json does not match"):
        _load(trained, path)
    monkeypatch.delenv(checkpoint.KEY_ENV)
    with pytest.raises(UntrustedCheckpoint, match="is signed; set LENS_CHECKPOINT_KEY"):
        _load(trained, path)
    monkeypatch.setenv(checkpoint.KEY_ENV, key)  # an unsigned checkpoint, where keys are on
    with pytest.raises(UntrustedCheckpoint, match="not signed, but LENS_CHECKPOINT_KEY"):
        _load(trained, checkpoint.latest(trained["ckpt"]))
    assert not marker.exists()


# --- end to end: a tiny pipeline run with secrets planted in its environment -------------------

SHORT = ["data.num_samples=64", "data.samples_per_shard=32", "vae.steps=4", "pretrain.steps=4",
         "pretrain.log_every=2", "pretrain.sample_every=4", "pretrain.ckpt_every=2",
         "eval.prompts_per_category=1", "gates.min_overall=0", "gates.max_latency_s=60"]
# Variables the test session's LENS_HOME decided; the run recomputes them from its own home.
DERIVED = ("LENS_HOME", "PREFECT_HOME", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "HF_HOME",
           "DVC_SITE_CACHE_DIR", "LENS_DVC_REMOTE", "LENS_DVC_REPO")


@pytest.mark.slow
def test_no_secret_from_the_environment_lands_anywhere(dvc_repo: Path, tmp_path: Path) -> None:
    """Plant a unique canary in each secret variable, run the tiny pipeline (shortened) in a
    subprocess with its own LENS_HOME, HOME and TMPDIR, and look for the canaries (and their
    base64) in everything it wrote: MLflow's SQLite store and every artifact, Prefect's
    database (flow and task runs, states, parameters, logs) and result storage, the DVC
    config and cache, every file git would commit, stray files in HOME and TMPDIR, and the
    run's stdout and stderr. A marker passed as a recipe value must be found in each store,
    so the scan provably reaches them."""
    secrets = canaries()
    marker = f"lens-sec-{uuid.uuid4().hex[:10]}"
    home, user_home, tmp = tmp_path / "lens-home", tmp_path / "user-home", tmp_path / "tmp"
    for folder in (user_home, tmp):
        folder.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in DERIVED}
    env |= secrets | {"LENS_HOME": str(home), "HOME": str(user_home), "TMPDIR": str(tmp),
                      "XDG_CONFIG_HOME": str(user_home / ".config"),
                      "XDG_CACHE_HOME": str(user_home / ".cache"),
                      "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:"
                                                       f"{os.environ['PATH']}"}
    args = ["run", "tiny", "--repo", str(dvc_repo),
            *sum((["--set", s] for s in [*SHORT, f"tracking.model_name={marker}"]), [])]
    proc = subprocess.run([sys.executable, "-m", "lens.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"lens run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    hits = scan_bytes("stdout", proc.stdout.encode(), secrets)
    hits += scan_bytes("stderr", proc.stderr.encode(), secrets)
    files = 0
    for root in (home, user_home, tmp, dvc_repo):  # dvc_repo: .dvc/config*, cache, data, git
        found, n = scan_tree(root, secrets)
        hits, files = hits + found, files + n
    # what git would commit (tracked, plus untracked files not ignored), listed by git itself
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=dvc_repo, capture_output=True, text=True, check=True)
    committable = [dvc_repo / f for f in listed.stdout.splitlines()]
    assert dvc_repo / "dvc.lock" in committable and dvc_repo / ".dvc" / "config" in committable
    for path in committable:
        hits += scan_bytes(f"git:{path}", path.read_bytes(), secrets)
    # the stores row by row too (a SQLite page is scanned raw above; this reads every row)
    mlflow_db, prefect_db = home / "mlflow.db", home / "prefect" / "prefect.db"
    stores = {"mlflow": list(sqlite_rows(mlflow_db)), "prefect": list(sqlite_rows(prefect_db))}
    for store, rows in stores.items():
        for table, row in rows:
            hits += scan_bytes(f"{store}.{table}", row.encode(), secrets)
    assert not hits, "secrets leaked:\n" + "\n".join(sorted(set(hits)))

    # The scan reached every store: the marker recipe value is in each, the runs are there.
    tables = {s: {t for t, _ in rows} for s, rows in stores.items()}
    mlflow_text = "\n".join(r for t, r in stores["mlflow"])
    prefect_text = "\n".join(r for t, r in stores["prefect"])
    assert marker in mlflow_text and marker in prefect_text and marker in proc.stdout
    assert sum(t == "runs" for t, _ in stores["mlflow"]) >= 6  # parent + 5 stage runs
    assert {"params", "tags", "metrics", "model_versions"} <= tables["mlflow"]
    assert sum(t == "log" for t, _ in stores["prefect"]) > 10
    assert sum(t == "task_run" for t, _ in stores["prefect"]) > 5
    assert f"registered {marker} version 1" in prefect_text  # a task's log line, stored
    artifacts = list((home / "mlartifacts").rglob("*.safetensors"))
    assert len(artifacts) >= 4 and files > 100, (artifacts, files)
