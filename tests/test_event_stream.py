"""Streaming a subprocess's events and output while it runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tasks.event_stream import EVENTS, EventTail, LaunchFailed, run_streaming

PROGRAM = """
import json, sys, time
from pathlib import Path
events = Path(sys.argv[1]) / "events.jsonl"
for step in range(3):
    with open(events, "a") as fh:
        fh.write(json.dumps({"step": step, "loss": 1.0 / (step + 1)}) + "\\n")
    print(f"step {step}", flush=True)
    time.sleep(0.2)
sys.exit(int(sys.argv[2]))
"""


def test_events_and_lines_stream_in_order(tmp_path: Path) -> None:
    events, lines = [], []
    run_streaming([sys.executable, "-c", PROGRAM, str(tmp_path), "0"], tmp_path,
                  events.append, lines.append, poll_s=0.05)
    assert [e["step"] for e in events] == [0, 1, 2]
    assert lines == ["step 0", "step 1", "step 2"]


def test_failure_raises_with_the_last_output(tmp_path: Path) -> None:
    with pytest.raises(LaunchFailed, match="exited 3(.|\n)*step 2"):
        run_streaming([sys.executable, "-c", PROGRAM, str(tmp_path), "3"], tmp_path,
                      lambda e: None, lambda s: None, poll_s=0.05)


def test_tail_waits_for_a_whole_line(tmp_path: Path) -> None:
    path = tmp_path / EVENTS
    tail = EventTail(path)
    path.write_bytes(b'{"a": 1}\n{"b"')
    assert tail.read() == [{"a": 1}]
    with open(path, "ab") as fh:
        fh.write(b': 2}\n')
    assert tail.read() == [{"b": 2}]
