"""The job contract: what a job child writes to its progress file, how it exits, and the states a
job moves through. The child (`python -m training.run`, the advisor, the quantizer) emits through
`Progress`; the service's runner reads the same names back (service/finetune/trace.py); the client
waits for `ENDED_STATES`. Torch-free, so the service and the fast job tests' fake trainer import it.

Events (one JSON object per line, flushed per line; `time` is added to each):
  {"event":"phase","phase":"loading|training|…|publishing"}
  {"event":"recipe","recipe":{…}}                                 chosen before training starts
  {"event":"progress","epoch":1,"epochs":3,"step":10,"steps":40,"train_loss":…,"val_accuracy":…,"val_loss":…,"eta_s":…}
  {"event":"epoch","epoch":1,"epochs":3,"train_loss":…,"val_accuracy":…,"val_loss":…}
  {"event":"stage","stage":"features","done":640,"total":60000,"eta_s":…}   work inside a phase
  {"event":"budget","budget_s":900}                                the job's whole wall-clock plan
  {"event":"succeeded","model":"name:version","eval":{…}}        or "advice":{…} (an advise job)
  {"event":"failed","reason":"…","cancelled":true?}
"""
from __future__ import annotations

import json
import math
import signal
import time
from enum import Enum, IntEnum
from typing import Any, Callable


class Event(str, Enum):
    """The `event` field of a progress line."""

    PHASE = "phase"
    RECIPE = "recipe"
    PROGRESS = "progress"
    EPOCH = "epoch"
    STAGE = "stage"
    BUDGET = "budget"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ExitCode(IntEnum):
    """How a job child exits; the runner judges an exit the same whichever child ran."""

    OK = 0  # published (a model version, advice, a variant)
    FAILED = 1  # anything unexpected; the progress file's `failed` event names it
    BAD_INPUT = 2  # bad config or bad data
    INTERRUPTED = 130  # SIGINT
    TERMINATED = 143  # SIGTERM: stopped on request, nothing published


# Exit statuses that mean "stopped from outside" (a shell's 128+N, or Popen's -N): resumable.
STOPPED_BY_SIGNAL = frozenset({ExitCode.TERMINATED, -signal.SIGTERM, ExitCode.INTERRUPTED, -signal.SIGINT})

# Stages inside the phases, as `stage` events name them (bench/scale.py times each).
STAGES = ("features", "heads", "partial", "finetune", "export", "calibration", "evaluation", "int8")
PHASES = ("loading", "training", "exporting", "parity", "calibrating", "evaluating", "quantizing", "publishing")
# What a `progress`/`epoch` event carries into the job's status, and what an `epoch` adds to its history.
PROGRESS_KEYS = ("epoch", "epochs", "step", "steps", "train_loss", "val_accuracy", "val_loss", "eta_s")
HISTORY_KEYS = ("epoch", "train_loss", "val_accuracy", "val_loss")

STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
ACTIVE_STATES = frozenset({"queued", "running"})
# No process behind the job any more; only a resume (RESUMABLE_STATES) moves it on.
ENDED_STATES = frozenset(STATES) - ACTIVE_STATES
RESUMABLE_STATES = frozenset({"interrupted", "failed", "cancelled"})

# What the job child runs for each kind besides the fine-tune pipeline (training/run.py's own):
# `module:function(config_path, progress, stop) -> ExitCode`, chosen by the config's `kind`.
RUNNER_ENTRIES = {
    "advise": "models.transfer.advise:run_advise_job",
    "quantize": "models.jobs.quantize:run_quantize_job",
}

Callback = Callable[[dict[str, Any]], None]


def _clean(value: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Progress:
    """Fan-out of progress events to callbacks (a JSONL writer, a test's list); the one place that
    names the events' fields."""

    def __init__(self, *callbacks: Callback | None):
        self.callbacks = [c for c in callbacks if c is not None]

    def emit(self, event: Event, **fields: Any) -> dict[str, Any]:
        record = {"event": Event(event).value, **{k: _clean(v) for k, v in fields.items()}}
        record.setdefault("time", time.time())
        for callback in self.callbacks:
            callback(record)
        return record

    def phase(self, phase: str) -> None:
        assert phase in PHASES, phase
        self.emit(Event.PHASE, phase=phase)

    def recipe(self, recipe: dict[str, Any]) -> dict[str, Any]:
        """The training recipe chosen from the data, before training starts (the job shows it at once)."""
        return self.emit(Event.RECIPE, recipe=recipe)

    def step(self, epoch: int, epochs: int, step: int, steps: int, train_loss: float, eta_s: float,
             val_accuracy: float | None = None, val_loss: float | None = None) -> dict[str, Any]:
        """Within an epoch (1-based `epoch` and `step`); val_* are the last epoch's, None before the first."""
        return self.emit(Event.PROGRESS, epoch=epoch, epochs=epochs, step=step, steps=steps, train_loss=train_loss,
                         eta_s=eta_s, val_accuracy=val_accuracy, val_loss=val_loss)

    def count(self, step: int, steps: int, **detail: Any) -> dict[str, Any]:
        """Progress through a one-pass job (the advisor's candidates): epoch 1 of 1, so the runner's
        percentage works unchanged."""
        return self.emit(Event.PROGRESS, epoch=1, epochs=1, step=step, steps=steps, **detail)

    def stage(self, stage: str, done: int, total: int, eta_s: float | None = None, **detail: Any) -> dict[str, Any]:
        """Work done inside a phase (images through the feature pass, head fits, evaluation batches):
        `stage` names it (STAGES), `eta_s` is that stage's own estimate."""
        return self.emit(Event.STAGE, stage=stage, done=done, total=total, eta_s=eta_s, **detail)

    def budget(self, budget_s: float) -> dict[str, Any]:
        """The job's wall-clock budget from start to publish (sent again when the plan changes it)."""
        return self.emit(Event.BUDGET, budget_s=round(float(budget_s), 1))

    def epoch_end(self, epoch: int, epochs: int, train_loss: float, val_accuracy: float, val_loss: float) -> dict[str, Any]:
        return self.emit(Event.EPOCH, epoch=epoch, epochs=epochs, train_loss=train_loss, val_accuracy=val_accuracy,
                         val_loss=val_loss)

    def succeeded(self, model: str, eval: dict[str, Any]) -> dict[str, Any]:  # noqa: A002 - the event's field name
        """The last event of a run that published `model` (name:version), with its eval summary."""
        return self.emit(Event.SUCCEEDED, model=model, eval=eval)

    def advised(self, advice: dict[str, Any]) -> dict[str, Any]:
        """The last event of an advise run that wrote its advice (a summary of it)."""
        return self.emit(Event.SUCCEEDED, advice=advice)

    def failed(self, reason: str, cancelled: bool = False) -> dict[str, Any]:
        """The last event of a run that published nothing; `cancelled` when a SIGTERM stopped it."""
        return self.emit(Event.FAILED, reason=reason, **({"cancelled": True} if cancelled else {}))


def parse_line(line: bytes | str) -> dict[str, Any] | None:
    """One progress line → its event, or None for a blank, cut or foreign line (never raises)."""
    if not line.strip():
        return None
    try:
        event = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(event, dict) or event.get("event") not in {e.value for e in Event}:
        return None
    return event


def published(event: dict[str, Any] | None) -> bool:
    """A `succeeded` event that reports something the job produced (a model version or advice)."""
    return bool(event and (event.get("model") or event.get("advice")))


def result_of(event: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """(model, the eval or advice summary) of a `succeeded` event, as the job records them."""
    return event.get("model"), event.get("eval") or event.get("advice")
