"""Launch a training program as a subprocess and stream its progress while it runs.

The program (``lens_model/train/*``) knows nothing of MLflow or Prefect: rank 0 appends one
JSON record per event to ``RUN_DIR/events.jsonl``. This module tails that file and hands each
record to a callback (which logs metrics and artifacts to MLflow and progress to Prefect), and
forwards the program's output lines to the task's logger.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

EVENTS = "events.jsonl"


class LaunchFailed(RuntimeError):
    """The training program exited non-zero; the message holds its last output lines."""


class EventTail:
    """Reads complete JSON lines appended to a file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, b""

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()  # an unfinished last line waits for the next read
        return [json.loads(line) for line in lines if line.strip()]


def run_streaming(cmd: list[str], run_dir: Path, on_event: Callable[[dict[str, Any]], None],
                  log: Callable[[str], None], env: dict[str, str] | None = None,
                  poll_s: float = 1.0) -> int:
    """Run ``cmd``; call ``on_event`` for each event rank 0 writes, ``log`` for each output
    line. Returns 0, or raises :class:`LaunchFailed` with the output's last lines."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tail = EventTail(run_dir / EVENTS)
    tail.offset = (run_dir / EVENTS).stat().st_size if (run_dir / EVENTS).exists() else 0
    last_lines: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, bufsize=1)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            last_lines.append(line.rstrip())
            log(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    while proc.poll() is None:
        for event in tail.read():
            on_event(event)
        time.sleep(poll_s)
    reader.join(timeout=10)
    for event in tail.read():
        on_event(event)
    if proc.returncode != 0:
        raise LaunchFailed(f"`{' '.join(cmd)}` exited {proc.returncode}; last output:\n"
                           + "\n".join(last_lines))
    return 0
