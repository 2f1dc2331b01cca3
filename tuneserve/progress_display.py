"""What `tuneserve train` shows on stderr while a job runs: one bar for the whole job on a terminal,
a plain line at least every `TICK_S` seconds (and at every phase change) when stderr is a log.

`ProgressDisplay` is a `Progress` callback (models/jobs/events.py): it folds the job's `phase`,
`stage`, `progress` and `budget` events into a `JobView` and draws it. Torch-free; stdout (the run's
summary JSON) is never written.

The job's ETA (`JobView.eta_s`): the budget left, max(0, budget − elapsed), or the current stage's
own remaining estimate when that is larger (a stage running past the plan moves the end out). Before
a `budget` event it is the stage's estimate alone, or unknown. The bar's total is the budget, grown to
elapsed + ETA when the job runs past it, so its percentage and the ETA shown always agree.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from models.jobs.events import Event

TICK_S = 20.0  # not a terminal: a line at least this often (the issue asks for one every 30 s at most)
BAR_TICK_S = 1.0  # a terminal: the bar advances with time this often
# The unit a stage counts in, when its event names none (`unit=` in the event's detail wins).
STAGE_UNITS = {"features": "images", "evaluation": "images", "int8": "methods", "export": "steps"}


def _seconds(value: float) -> str:
    return f"{max(0.0, value):.0f}s"


@dataclass
class JobView:
    """The job so far, from its events; `now` is the display's clock (seconds, like time.monotonic)."""

    started: float
    phase: str | None = None
    budget_s: float | None = None
    work: dict[str, Any] | None = None  # the latest `stage` or `progress` event inside this phase
    work_seen: float = 0.0  # when it arrived (its eta_s counts down from there)
    ended: str | None = None  # "succeeded" or "failed" once such an event arrived
    seen: int = 0  # events folded in

    def update(self, event: dict[str, Any], now: float) -> bool:
        """Fold one event in; True when it changed the phase (a non-terminal display prints a line)."""
        kind = event.get("event")
        self.seen += 1
        if kind == Event.PHASE and event.get("phase") != self.phase:
            self.phase, self.work = event.get("phase"), None  # a stage belongs to its phase
            return True
        if kind == Event.BUDGET and event.get("budget_s") is not None:
            self.budget_s = float(event["budget_s"])
        elif kind in (Event.STAGE, Event.PROGRESS):
            self.work, self.work_seen = event, now
        elif kind in (Event.SUCCEEDED, Event.FAILED):
            self.ended = str(kind)
        return False

    def elapsed(self, now: float) -> float:
        return max(0.0, now - self.started)

    def work_eta_s(self, now: float) -> float | None:
        """The current stage's (or epoch's) own estimate, counted down since its event."""
        eta = (self.work or {}).get("eta_s")
        return None if eta is None else max(0.0, float(eta) - (now - self.work_seen))

    def eta_s(self, now: float) -> float | None:
        """The whole job's ETA: max(budget left, the stage's own estimate); None when neither is known."""
        left = None if self.budget_s is None else max(0.0, self.budget_s - self.elapsed(now))
        known = [eta for eta in (left, self.work_eta_s(now)) if eta is not None]
        return max(known) if known else None

    def total_s(self, now: float) -> float | None:
        """The bar's total: the budget, or elapsed + ETA when the job runs past it."""
        if self.budget_s is None:
            return None
        return max(self.budget_s, self.elapsed(now) + (self.eta_s(now) or 0.0))

    def work_text(self) -> str:
        """`features 21,440/60,000 images` or `epoch 2/3 step 10/40`; '' when nothing runs inside the phase."""
        work = self.work or {}
        if work.get("event") == Event.STAGE:
            unit = work.get("unit") or STAGE_UNITS.get(str(work.get("stage")), "")
            text = f"{work.get('stage')} {work.get('done') or 0:,}/{work.get('total') or 0:,}"
            return f"{text} {unit}".rstrip() + (f" ({work['method']})" if work.get("method") else "")
        if work.get("event") == Event.PROGRESS:
            return f"epoch {work.get('epoch')}/{work.get('epochs')} step {work.get('step')}/{work.get('steps')}"
        return ""

    def _work_eta_text(self, now: float) -> str | None:
        eta = self.work_eta_s(now)
        if eta is None:
            return None
        return f"{'stage' if (self.work or {}).get('event') == Event.STAGE else 'training'} eta {_seconds(eta)}"

    def line(self, now: float) -> str:
        """One log line, e.g.
        `[  312s] training · features 21,440/60,000 images · stage eta 240s · job eta 588s of 900s budget`."""
        parts = [self.phase or "starting"]
        if text := self.work_text():
            parts.append(text)
        if stage_eta := self._work_eta_text(now):
            parts.append(stage_eta)
        eta = self.eta_s(now)
        budget = f" of {_seconds(self.budget_s)} budget" if self.budget_s is not None else ""
        parts.append(f"job eta {_seconds(eta) if eta is not None else '?'}{budget}")
        return f"[{self.elapsed(now):5.0f}s] " + " · ".join(parts)

    def postfix(self, now: float) -> str:
        """The bar's text after the counts: the work inside the phase, its eta and the job's."""
        parts = [text] if (text := self.work_text()) else []
        if stage_eta := self._work_eta_text(now):
            parts.append(stage_eta)
        if (eta := self.eta_s(now)) is not None:
            parts.append(f"eta {_seconds(eta)}")
        return " · ".join(parts)


class ProgressDisplay:
    """A `Progress` callback that shows the job on `stream` (stderr): a tqdm bar on a terminal, else a
    line at least every `interval` seconds and at each phase change. A daemon ticker thread keeps the
    time moving between events; use it as a context manager (or `start()` / `close()`) so the thread
    stops when the run ends, also on an exception.

    `tty`: None asks `stream.isatty()`. `interval`: seconds between lines (not a terminal) or bar
    refreshes (a terminal); default `TICK_S` / `BAR_TICK_S`. `clock`: monotonic seconds (tests).
    """

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.interval = interval if interval is not None else (BAR_TICK_S if self.tty else TICK_S)
        self.clock = clock
        self.view = JobView(started=clock())
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_line = self.view.started
        self._ended = False
        self._logs = None  # a terminal: logging goes through tqdm.write while the bar is up
        self._bar = self._new_bar() if self.tty else None

    # --------------------------------------------------------------- the Progress callback

    def __call__(self, event: dict[str, Any]) -> None:
        with self._lock:
            now = self.clock()
            phase_changed = self.view.update(event, now)
            if self._bar is not None:
                self._draw_bar(now)
            elif phase_changed:
                self._print_line(now)

    # --------------------------------------------------------------- the ticker

    def start(self) -> ProgressDisplay:
        if self._bar is not None and self._logs is None:  # log lines print above the bar, not through it
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._logs = logging_redirect_tqdm()
            self._logs.__enter__()
        if self._thread is None:
            self._thread = threading.Thread(target=self._tick, name="tuneserve-progress", daemon=True)
            self._thread.start()
        return self

    def close(self, ok: bool = True) -> None:
        """Stop the ticker (waits for it) and end the bar, or print the last line."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        with self._lock:
            now = self.clock()
            if self._bar is not None:
                self._draw_bar(now)
                self._bar.close()
                self._bar = None
            if self._logs is not None:
                self._logs.__exit__(None, None, None)
                self._logs = None
            if not self.tty and self.view.seen and not self._ended:  # the log's last line: how it ended
                self._ended = True
                end = "done" if ok and self.view.ended != Event.FAILED else "stopped"
                budget = f" of {_seconds(self.view.budget_s)} budget" if self.view.budget_s is not None else ""
                self._write(f"[{self.view.elapsed(now):5.0f}s] {end} after {_seconds(self.view.elapsed(now))}{budget}")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> ProgressDisplay:
        return self.start()

    def __exit__(self, kind, error, traceback) -> None:
        self.close(ok=kind is None)

    def _tick(self) -> None:
        wait = self.interval
        while not self._stop.wait(wait):
            with self._lock:
                now = self.clock()
                if self._bar is not None:
                    self._draw_bar(now)
                    wait = self.interval
                    continue
                due = self._last_line + self.interval - now
                if due <= 0.0:  # a phase change may have printed since the last tick
                    self._print_line(now)
                    due = self.interval
                wait = max(0.01, due)

    # --------------------------------------------------------------- drawing (under the lock)

    def _new_bar(self):
        from tqdm import tqdm

        return tqdm(total=None, file=self.stream, desc="starting", unit="s", position=0, leave=True,
                    bar_format="{desc}: {n:.0f}s{postfix}", dynamic_ncols=True)

    def _draw_bar(self, now: float) -> None:
        bar, view = self._bar, self.view
        total = view.total_s(now)
        if total is not None and bar.total != total:
            bar.total = total
            bar.bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f}s{postfix}"
        bar.n = view.elapsed(now) if total is None else min(view.elapsed(now), total)
        bar.set_description_str(view.phase or "starting", refresh=False)
        bar.set_postfix_str(view.postfix(now), refresh=False)
        bar.refresh()

    def _print_line(self, now: float) -> None:
        self._last_line = now
        self._write(self.view.line(now))

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not fail the run
            pass
