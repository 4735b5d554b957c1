"""A reasoner on an OpenAI-compatible chat endpoint (vLLM, Ollama, a hosted model).

Each prompt is its own chat: the searched system prompt as the system message, with one line
added that asks for JSON, and the user's prompt as the user message. Retries, timeouts and
malformed answers are :func:`lens_model.rl.llm.chat_json`'s business; a prompt that still has
no usable answer after the endpoint's retries raises :class:`~lens_model.rl.llm.LLMError`,
because a rewrite silently missing would score the system prompt on fewer prompts.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lens_model.reasoner.base import check_system_prompt, finish_rewrites, new_stats
from lens_model.recipe import EndpointSection
from lens_model.rl.llm import chat_json, resolve

FORMAT_LINE = 'Answer with one JSON object and nothing else: {"prompt": "<the rewritten prompt>"}'


def _prompt_of(answer: dict[str, Any]) -> str:
    """The rewrite in ``answer``; a ValueError (so the chat is retried) if it has none.
    An empty string is a valid answer here: the shared helper decides what it becomes."""
    value = answer.get("prompt")
    if not isinstance(value, str):
        raise ValueError(f'the answer\'s "prompt" is {value!r}; expected a string')
    return value


def messages(system: str, prompt: str) -> list[dict[str, str]]:
    """The chat sent for one prompt."""
    return [
        {"role": "system", "content": f"{system}\n{FORMAT_LINE}"},
        {"role": "user", "content": prompt},
    ]


class OpenAIReasoner:
    """Rewrites prompts through ``endpoint``, ``workers`` chats at a time."""

    def __init__(
        self, endpoint: EndpointSection, max_system_chars: int = 2000, workers: int = 8
    ) -> None:
        resolve(endpoint)  # a missing URL or model is a setup error: fail before any search
        self.endpoint = endpoint
        self.max_system_chars = max_system_chars
        self.workers = workers
        self.stats = new_stats()

    def _ask(self, system: str, prompt: str, index: int) -> str:
        answer = chat_json(
            self.endpoint,
            messages(system, prompt),
            f"rewrite prompt {index} ({prompt[:60]!r})",
            check=lambda a: {"prompt": _prompt_of(a)},
            temperature=0,
        )
        return answer["prompt"]

    def rewrite(self, system_prompt: str, prompts: list[str]) -> list[str]:
        """One rewrite per prompt, in order; an LLMError if any prompt gets no usable answer."""
        system = check_system_prompt(system_prompt, self.max_system_chars)
        if not prompts:
            return []
        with ThreadPoolExecutor(max(1, min(self.workers, len(prompts)))) as pool:
            answers = list(
                pool.map(lambda i: self._ask(system, prompts[i], i), range(len(prompts)))
            )
        return finish_rewrites(prompts, answers, self.stats)
