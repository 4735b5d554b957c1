"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests: POST /v1/chat/completions.

``FakeOpenAI(handler)`` runs a ThreadingHTTPServer on a free port; ``handler(request_json)``
returns the reply's message content, or a :class:`Fault` (answer late, a broken body, an HTTP
error). Every request body is kept in ``requests`` and its headers in ``headers``, in
arrival order.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Fault:
    """What to do instead of (or before) a normal answer."""

    delay_s: float = 0.0          # wait first: past the client's timeout, it gives up
    content: str = ""             # the message content, when the answer still comes
    body: bytes | None = None     # a raw HTTP body in place of an OpenAI response
    status: int = 200


Handler = Callable[[dict[str, Any]], "str | Fault"]


def completion(content: str, model: str) -> dict[str, Any]:
    """An OpenAI chat.completion response carrying ``content``."""
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class FakeOpenAI:
    """``with FakeOpenAI(handler) as api: ... api.base_url ... api.requests``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "use FakeOpenAI as a context manager"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _request_handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                pass

            def _send(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, b'{"error": {"message": "not found"}}', "application/json")
                    return
                request = json.loads(raw)
                with fake._lock:
                    fake.requests.append(request)
                    fake.headers.append(dict(self.headers.items()))
                reply = fake.handler(request)
                fault = reply if isinstance(reply, Fault) else Fault(content=reply)
                time.sleep(fault.delay_s)
                try:
                    if fault.body is not None:
                        self._send(fault.status, fault.body, "application/json")
                    elif fault.status != 200:
                        err = {"error": {"message": "fake failure", "type": "server_error"}}
                        self._send(fault.status, json.dumps(err).encode(), "application/json")
                    else:
                        body = json.dumps(completion(fault.content, request.get("model", "")))
                        self._send(200, body.encode(), "application/json")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up, as a delayed fault means it to

        return RequestHandler

    def __enter__(self) -> FakeOpenAI:
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._request_handler())
        server.daemon_threads = True  # a delayed answer must not hold up the test's exit
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
