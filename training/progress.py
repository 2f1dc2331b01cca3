"""Progress reporting: a callback interface and the JSONL progress file of the jobs contract.

The job runner (service/finetune/runner.py) reads these events; the methods below are the only
place that names their fields, and the fake trainer of the fast job tests emits through them too
(so this module stays importable without torch: tests/test_boundaries.py).

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

    def step(self, epoch: int, epochs: int, step: int, steps: int, train_loss: float, eta_s: float,
             val_accuracy: float | None = None, val_loss: float | None = None) -> dict[str, Any]:
        """Within an epoch (1-based `epoch` and `step`); val_* are the last epoch's, None before the first."""
        return self.emit("progress", epoch=epoch, epochs=epochs, step=step, steps=steps, train_loss=train_loss,
                         eta_s=eta_s, val_accuracy=val_accuracy, val_loss=val_loss)

    def epoch_end(self, epoch: int, epochs: int, train_loss: float, val_accuracy: float, val_loss: float) -> dict[str, Any]:
        return self.emit("epoch", epoch=epoch, epochs=epochs, train_loss=train_loss, val_accuracy=val_accuracy,
                         val_loss=val_loss)

    def succeeded(self, model: str, eval: dict[str, Any]) -> dict[str, Any]:  # noqa: A002 - the event's field name
        """The last event of a run that published `model` (name:version), with its eval summary."""
        return self.emit("succeeded", model=model, eval=eval)

    def failed(self, reason: str, cancelled: bool = False) -> dict[str, Any]:
        """The last event of a run that published nothing; `cancelled` when a SIGTERM stopped it."""
        return self.emit("failed", reason=reason, **({"cancelled": True} if cancelled else {}))


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
