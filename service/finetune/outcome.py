"""How a job ended: from the child's exit status, its last event, and whether (and why) this worker
stopped it. One judgement for every backend (a Ray job's status is mapped to an exit code first)."""
from __future__ import annotations

import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from models.jobs.events import STOPPED_BY_SIGNAL, ExitCode, published, result_of
from service.finetune.trace import JobTrace

FULL_DISK_BYTES = 1024**2  # less free than this when a job fails: the failure notes the full disk
RESUME_HINT = "resume with POST /finetune/<job_id>/resume"


@dataclass(frozen=True)
class Stopping:
    """Why this worker is stopping a job ("cancel" | "shutdown" | "disk"), and which signals it has sent when."""

    why: str | None = None
    noticed_at: float | None = None
    term_sent: float | None = None
    kill_sent: float | None = None

    def noticed(self, why: str | None, now: float) -> Stopping:
        return Stopping(why, now) if why else self

    def due(self, phase: str, now: float, grace: float) -> str | None:
        """What to do to the training process now: "terminate", "kill" or nothing."""
        if self.why and self.term_sent is None:
            # A publish in progress is let finish (briefly): the version is either fully
            # there or not at all, and the job then reports what really happened.
            if phase != "publishing" or now - self.noticed_at > grace:
                return "terminate"
        elif self.term_sent is not None and self.kill_sent is None and now - self.term_sent > grace:
            return "kill"
        return None


class Outcome(NamedTuple):
    state: str
    model: str | None
    eval: dict[str, Any] | None
    error: str | None

    @classmethod
    def unfinished(cls, state: str, error: str) -> Outcome:
        """Any end but success: no model version."""
        return cls(state, None, None, error)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def with_disk_note(error: str | None, job_dir: Path) -> str | None:
    """A failure on a (nearly) full disk says so: the log and progress file may be cut short."""
    try:
        free = shutil.disk_usage(job_dir).free
    except OSError:
        return error
    if free >= FULL_DISK_BYTES:
        return error
    return f"{error}; the disk holding the job folder has only {free} bytes free (full disk?)"


def judge(returncode: int | None, trace: JobTrace, stopping: Stopping, log_path: Path) -> Outcome:
    """The job's final state from the exit status, the last events and whether this worker stopped it."""
    if published(trace.succeeded):
        return _published(returncode, trace.succeeded, stopping.why)
    stopped = _stopped_by_worker(stopping)
    if stopped is not None:
        return stopped
    if returncode in STOPPED_BY_SIGNAL:
        # SIGTERM/SIGINT that this worker did not send: a server shutdown (BentoML's process
        # supervisor signals a worker's children) or the parent-death signal. Resumable.
        name = "SIGINT" if returncode in (ExitCode.INTERRUPTED, -signal.SIGINT) else "SIGTERM"
        return Outcome.unfinished("interrupted", f"training process was stopped by {name} from outside the job "
                                                 f"(server shutdown?); {RESUME_HINT}")
    if returncode is not None and returncode < 0:
        number = -returncode
        reason = f"training process was killed by signal {number} ({signal_name(number)})"
        if number == signal.SIGKILL:
            reason += "; out of memory or killed by an operator?"
        return Outcome.unfinished("failed", reason)
    if trace.failed is not None:
        return Outcome.unfinished("failed", str(trace.failed.get("reason") or f"training failed (exit code {returncode})"))
    if returncode == ExitCode.OK:
        return Outcome.unfinished("failed", "training exited 0 without reporting a published model")
    # The log's tail (a traceback with server paths) stays in the log, which needs a key to read.
    return Outcome.unfinished("failed", f"training exited with code {returncode}; its log says why (GET <kind>/<job_id>/log, with a key)")


def _published(returncode: int | None, final: dict[str, Any], why_stopped: str | None) -> Outcome:
    """A version published (or advice written): succeeded, whatever came after."""
    note = None
    if why_stopped == "cancel":
        note = "cancel arrived after the model version was published; it stays published"
    elif returncode != ExitCode.OK:
        note = f"training exited with {returncode} after publishing"
    model, result = result_of(final)
    return Outcome("succeeded", model, result, note)


def _stopped_by_worker(stopping: Stopping) -> Outcome | None:
    if stopping.why == "shutdown":
        return Outcome.unfinished("interrupted", f"the server stopped during the job; {RESUME_HINT}")
    if stopping.why == "cancel":
        how = " (killed after the grace period)" if stopping.kill_sent else ""
        return Outcome.unfinished("cancelled", f"cancelled on request{how}; no model version was published")
    if stopping.why == "disk":
        return Outcome.unfinished("failed", (
            "stopped: the disk holding the job folder fell below the free-space floor (TUNESERVE_FINETUNE_MIN_FREE_MB); "
            f"no model version was published; free some space, then {RESUME_HINT}"
        ))
    return None
