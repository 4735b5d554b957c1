"""Secrets stay out of what is logged: mask secret-named keys, secret environment values and
URI passwords. Light (no heavy imports), so the CLI, the services launcher and the tasks that
log to MLflow share it."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
MIN_SECRET_LEN = 6  # shorter values ("1", "true") are flags, and masking them would garble text
_SECRET_TEXT = re.compile(r"passw(or)?d|secret|credential|private|access_?key|api_?key", re.I)
# short words count only as a name's last word: HF_TOKEN, but not token_budget or tokenizer
_SECRET_LAST = re.compile(r"(^|[^a-z])(token|key|auth|cookie|signature|pat)$", re.I)
_URI_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)[^\s@/]+(?=@)", re.I)


def is_secret_name(name: str) -> bool:
    """Whether a variable or key name says it holds a secret (``AWS_SECRET_ACCESS_KEY``,
    ``MLFLOW_TRACKING_TOKEN``, ``PGPASSWORD``, ``api_key``); ``token_budget`` does not."""
    return bool(_SECRET_TEXT.search(name) or _SECRET_LAST.search(name))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of the environment's secret-named variables, longest first."""
    env = os.environ if environ is None else environ
    found = {v for k, v in env.items() if is_secret_name(k) and len(v) >= MIN_SECRET_LEN}
    return sorted(found, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with secret environment values and URI passwords replaced by ``***``."""
    for value in secret_values(environ):
        text = text.replace(value, MASK)
    return _URI_PASSWORD.sub(lambda m: m.group("head") + MASK, text)


def redact_mapping(values: Mapping[str, Any],
                   environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Params or tags as strings, safe to log: secret-named keys masked, values redacted."""
    return {k: MASK if is_secret_name(k) else redact(str(v), environ)
            for k, v in values.items()}
