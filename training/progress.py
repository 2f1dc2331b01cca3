"""Progress reporting: a callback interface and the JSONL progress file of the jobs contract.

Events (one JSON object per line, flushed per line):
  {"event":"phase","phase":"loading|training|exporting|parity|calibrating|evaluating|quantizing|publishing","time":...}
  {"event":"progress","epoch":1,"epochs":3,"step":10,"steps":40,"train_loss":..,"val_accuracy":..,"val_loss":..,"eta_s":..,"time":...}
  {"event":"epoch","epoch":1,"epochs":3,"train_loss":..,"val_accuracy":..,"val_loss":..,"time":...}
  {"event":"succeeded","model":"name:version","eval":{accuracy, top_k_accuracy, samples, macro_f1}}
  {"event":"failed","reason":"..."}
"""
from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable

PHASES = ("loading", "training", "exporting", "parity", "calibrating", "evaluating", "quantizing", "publishing")

Callback = Callable[[dict[str, Any]], None]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Progress:
    """Fan-out of progress events to callbacks; `emit(event, **fields)`."""

    def __init__(self, *callbacks: Callback):
        self.callbacks = [c for c in callbacks if c is not None]

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, **{k: _clean(v) for k, v in fields.items()}}
        record.setdefault("time", time.time())
        for callback in self.callbacks:
            callback(record)
        return record

    def phase(self, phase: str) -> None:
        assert phase in PHASES, phase
        self.emit("phase", phase=phase)


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
