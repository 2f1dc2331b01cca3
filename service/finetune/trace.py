"""What a job child has reported so far: its progress events folded into the job's status.

A `stage` event sets `stage`, `stage_done`, `stage_total`, `stage_eta_s` (the work inside the current
phase; a new phase drops them), a `budget` event sets `budget_s` (the job's whole wall-clock plan)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.jobs.events import HISTORY_KEYS, PROGRESS_KEYS, Event

# A `stage` event's fields → the job's progress keys (dropped when the phase changes).
STAGE_KEYS = {"stage": "stage", "done": "stage_done", "total": "stage_total", "eta_s": "stage_eta_s"}


def percent_done(progress: dict[str, Any], epoch_ended: bool) -> float | None:
    """How much of the whole run is done, from the last progress/epoch event; None until it can be known."""
    epochs, steps, epoch = progress.get("epochs"), progress.get("steps"), progress.get("epoch")
    if not (epochs and steps and epoch):
        return None
    step = steps if epoch_ended else (progress.get("step") or 0)
    return round(100.0 * min(1.0, ((epoch - 1) * steps + step) / (epochs * steps)), 1)


@dataclass
class JobTrace:
    """The progress file, folded: the status fields, the phase, and the last event if final."""

    progress: dict[str, Any]
    phase: str = "starting"
    succeeded: dict[str, Any] | None = None
    failed: dict[str, Any] | None = None

    def apply(self, events: list[dict[str, Any]]) -> bool:
        """Fold `events` in; True when the phase or the progress changed (the store needs an update)."""
        changed = False
        for event in events:
            kind = event.get("event")
            if kind == Event.PHASE and event.get("phase"):
                if str(event["phase"]) != self.phase:  # a stage belongs to the phase it ran in
                    for key in STAGE_KEYS.values():
                        self.progress.pop(key, None)
                self.phase = str(event["phase"])
                changed = True
            elif kind == Event.STAGE and event.get("stage"):
                self.progress.update({ours: event.get(theirs) for theirs, ours in STAGE_KEYS.items()})
                changed = True
            elif kind == Event.BUDGET and event.get("budget_s") is not None:
                self.progress["budget_s"] = event["budget_s"]
                changed = True
            elif kind == Event.RECIPE:  # chosen before training starts: shown in the job status at once
                self.progress["recipe"] = event.get("recipe")
                changed = True
            elif kind in (Event.PROGRESS, Event.EPOCH):
                self._count(event, kind == Event.EPOCH)
                changed = True
            elif kind == Event.SUCCEEDED:
                self.succeeded = event
            elif kind == Event.FAILED:
                self.failed = event
        return changed

    def _count(self, event: dict[str, Any], epoch_ended: bool) -> None:
        self.progress.update({k: event[k] for k in PROGRESS_KEYS if k in event})
        if epoch_ended:
            self.progress["epochs_done"] = event.get("epoch")
            self.progress.setdefault("history", []).append({k: event.get(k) for k in HISTORY_KEYS})
        percent = percent_done(self.progress, epoch_ended)
        if percent is not None:
            self.progress["percent"] = percent
