"""Progress reporting for a job child: the event emitter (models/jobs/events.py, the job contract,
re-exported here) and the JSONL progress file the service's runner tails.

The fake trainer of the fast job tests emits through these too, so this module stays importable
without torch (tests/test_boundaries.py).
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

from models.jobs.events import PHASES, Callback, Event, Progress

__all__ = ["PHASES", "Callback", "Event", "JsonlWriter", "Progress", "StageMeter", "read_events"]


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


class StageMeter:
    """Reports one stage (`Progress.stage`) as its work gets done, with the stage's own ETA: seconds
    so far / done × what is left. Call it with the count done so far; it emits the first call, the
    last (`done >= total`), and otherwise at most every `every_s` seconds, so a per-batch loop does
    not flood the progress file. Extra keyword arguments (`unit="images"`, `method=…`) ride along.
    """

    def __init__(self, progress: Progress, stage: str, total: int, every_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, **detail: Any):
        self.progress, self.stage, self.total, self.every_s = progress, stage, int(total), every_s
        self.clock, self.detail = clock, detail
        self.started = clock()
        self._last: float | None = None

    def __call__(self, done: int, **detail: Any) -> None:
        now = self.clock()
        final = done >= self.total
        if not final and self._last is not None and now - self._last < self.every_s:
            return
        self._last = now
        elapsed = now - self.started
        eta = 0.0 if final else (round(elapsed / done * (self.total - done), 1) if done > 0 else None)
        self.progress.stage(self.stage, int(done), self.total, eta, **{**self.detail, **detail})


def read_events(path: str | Path) -> list[dict[str, Any]]:
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
