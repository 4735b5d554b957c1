"""A small client for OpenAI-compatible chat endpoints (vLLM, Ollama, hosted) that answer JSON.

:func:`chat_json` sends one chat, reads a JSON object from the answer (bare, or in a
```json fenced block), lets the caller check it, and retries a bounded number of times on
timeouts, server errors, malformed bodies and answers that fail the check. The last failure
is raised as an :class:`LLMError` that names what was asked for and the endpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from lens_model.recipe import EndpointSection

log = logging.getLogger(__name__)
FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


class LLMError(RuntimeError):
    """No usable answer: the message names what was asked, the endpoint and the last error."""


def _safe_url(url: str) -> str:
    """``url`` without user:password, so errors and logs never carry credentials."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def resolve(endpoint: EndpointSection) -> tuple[str, str]:
    """(base_url, model) from the recipe, else ``$LENS_LLM_BASE_URL`` / ``$LENS_LLM_MODEL``."""
    base_url = endpoint.base_url or os.environ.get("LENS_LLM_BASE_URL", "")
    model = endpoint.model or os.environ.get("LENS_LLM_MODEL", "")
    missing = [name for name, v in (("base_url", base_url), ("model", model)) if not v]
    if missing:
        raise LLMError(f"the chat endpoint has no {' or '.join(missing)}: set it in the recipe "
                       f"(endpoint.{missing[0]}) or in "
                       f"${'LENS_LLM_BASE_URL' if missing[0] == 'base_url' else 'LENS_LLM_MODEL'}")
    return base_url, model


def extract_json(text: str) -> dict[str, Any]:
    """The JSON object in ``text``: the whole text, a fenced block, or the outermost braces."""
    candidates = [text.strip(), *(m.strip() for m in FENCE.findall(text))]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start:end + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    raise ValueError(f"the answer holds no JSON object: {text[:200]!r}")


def chat_json(endpoint: EndpointSection, messages: list[dict[str, Any]], what: str,
              check: Callable[[dict[str, Any]], Any] | None = None,
              **create: Any) -> dict[str, Any]:
    """Ask the endpoint, return its answer as a JSON object (``check(answer)`` may raise a
    ValueError to reject it, or return a replacement); ``create`` goes to the API call
    (e.g. ``temperature``)."""
    import openai  # here: only the LLM backends need it

    base_url, model = resolve(endpoint)
    where = f"{model} at {_safe_url(base_url)}"
    # Retries are ours, not the client's, so the bound is exactly endpoint.max_retries and
    # every failure is seen (the client would also retry 4xx-free errors silently).
    client = openai.OpenAI(base_url=base_url, timeout=endpoint.timeout_s, max_retries=0,
                           api_key=os.environ.get(endpoint.key_variable) or "EMPTY")
    tries = endpoint.max_retries + 1
    last = ""
    for attempt in range(1, tries + 1):
        try:
            reply = client.chat.completions.create(model=model, messages=messages, **create)
            content = reply.choices[0].message.content or ""
            answer = extract_json(content)
            if check is not None:
                checked = check(answer)
                answer = answer if checked is None else checked
            return answer
        except openai.APITimeoutError:
            last = f"no answer within {endpoint.timeout_s} s (endpoint.timeout_s)"
        except openai.APIStatusError as exc:
            if exc.status_code < 500 and exc.status_code not in (408, 409, 429):
                # A wrong key, model or request does not get better by asking again.
                raise LLMError(f"{what}: {where} refused the request (HTTP {exc.status_code}): "
                               f"{exc.message}; check endpoint.model, endpoint.base_url and "
                               f"${endpoint.key_variable}") from None
            last = f"HTTP {exc.status_code}: {exc.message}"
        except openai.APIConnectionError as exc:
            last = f"cannot connect: {exc}"
        except (openai.APIError, ValueError, KeyError, TypeError, IndexError,
                AttributeError) as exc:
            last = f"unusable answer: {exc}"
        log.warning("%s: try %d of %d failed at %s: %s", what, attempt, tries, where, last)
    raise LLMError(f"{what}: no valid answer from {where} after {tries} tries "
                   f"(endpoint.max_retries={endpoint.max_retries}); last error: {last}")
