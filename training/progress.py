"""Progress reporting for a job child: the event emitter (models/jobs/events.py, the job contract,
re-exported here) and the JSONL progress file the service's runner tails.

The fake trainer of the fast job tests emits through these too, so this module stays importable
without torch (tests/test_boundaries.py).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from models.jobs.events import PHASES, Callback, Event, Progress

__all__ = ["PHASES", "Callback", "Event", "JsonlWriter", "Progress", "read_events"]


class JsonlWriter:
    """Appends events to a JSONL file, one flushed line each (safe to tail while training runs)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._handle = self.path.open("a", buffering=1)

    def __call__(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str)
        with self._lock:
            self._handle.write(line + "\n")
            self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_events(path: str | Path) -> list[dict[str, Any]]:
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
