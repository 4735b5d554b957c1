"""Weights come from safetensors only: pickle files (``torch.save``'s ``.pt``/``.bin``/``.ckpt``
and plain pickles) are refused before anything opens them, because unpickling runs whatever
code the file names.

Two rules, for the two kinds of folder we load:
- our own folders (a saved ``LensPipeline``, a training ``final/``): we write safetensors only,
  so any pickle file in them is refused (:func:`refuse_pickles`, strict);
- third-party model folders (a Hugging Face LM, a pretrained VAE): a download often ships a
  ``pytorch_model.bin`` beside ``model.safetensors``. The loaders are called with
  ``use_safetensors=True``, so the pickle is never read; a folder whose weights exist only as
  pickles is refused (:func:`require_safetensors`).

A pickle file passed directly as a model path is refused too (:func:`refuse_pickle_path`).
"""

from __future__ import annotations

from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
SAFE_SUFFIX = ".safetensors"


class UnsafeWeightsError(ValueError):
    """A pickle file was offered as weights; the message names the file and the fix."""

    def __init__(self, what: str, path: Path, why: str = "") -> None:
        self.path = path
        super().__init__(
            f"{what}: refusing {path}: {why or 'it is a pickle file'}. Lens loads weights "
            f"from safetensors only (unpickling a file runs any code it holds). Fix: convert it "
            f"to {SAFE_SUFFIX} where you trust its source (load it once, then save_pretrained("
            f"..., safe_serialization=True) or safetensors.torch.save_file), or download the "
            f"model's .safetensors weights (e.g. `hf download REPO --include '*.safetensors' "
            f"'*.json' '*.txt'`), and pass the folder holding them")


def is_pickle(path: str | Path) -> bool:
    """Whether ``path``'s name marks a pickle (or torch.save) file."""
    return Path(path).name.lower().endswith(PICKLE_SUFFIXES)


def refuse_pickle_path(path: str | Path, what: str) -> None:
    """Refuse a pickle file passed where a model folder (or safetensors file) belongs."""
    path = Path(path).expanduser()
    if is_pickle(path):
        raise UnsafeWeightsError(what, path, "it is a pickle file passed as the model")


def refuse_pickles(folder: str | Path, what: str) -> None:
    """Strict: refuse ``folder`` if any file under it is a pickle (our own formats)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return
    found = sorted(p for p in folder.rglob("*") if p.is_file() and is_pickle(p))
    if found:
        raise UnsafeWeightsError(what, found[0], f"{folder} holds a pickle file "
                                                 f"({len(found)} in all), which Lens never writes")


def require_safetensors(folder: str | Path, what: str) -> None:
    """Refuse a model folder whose weights exist only as pickle files (third-party folders:
    pickles beside safetensors are fine, since the loader then reads the safetensors)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.name.endswith(SAFE_SUFFIX) for p in files):
        return
    pickles = sorted(p for p in files if is_pickle(p))
    if pickles:
        raise UnsafeWeightsError(what, pickles[0], "the folder's only weights are pickle files")
