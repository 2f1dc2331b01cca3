"""The loop's background task in each serving worker: everything that must not slow a response.

Every `flush_s` it drains the plane's queue and, in a thread: writes the prediction records,
stores the captures the sampling rule keeps (service/loop/capture.py) and the drift samples.
Shadow copies run on the candidate through the pool's batcher (decoded here, never through the
data plane, so they are neither recorded as answers nor shadowed again). Every `refresh_s` it
re-reads rollouts and capture switches; every `drift_interval_s` it sets the gauges from the
database and, in the one worker that holds the duties lease, computes each version's next drift
window and applies the auto-promote policy when it is on. `flush()` writes the queue at once (for
feedback on an answer the periodic write has not reached yet).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import uuid
from typing import Any

import numpy as np

from models.artifact import store
from models.serving.preprocess import decode_image, resize_and_crop
from models.artifact.reference import Reference, load_reference
from service.loop import drift, records, rollout
from service.loop.capture import Captured, capture_reason
from service.loop.metrics import count_answered, loop_metrics, set_gauge


log = logging.getLogger("tuneserve.loop")
DUTIES = "loop-duties"  # the lease: drift windows and auto-promote run in the one worker that holds it


@functools.lru_cache(maxsize=64)
def reference_of(model: str, version: str) -> tuple[Reference | None, tuple[str, ...]]:
    """A version's drift reference and labels (versions never change once published)."""
    resolved = store.resolve(f"{model}:{version}")
    return load_reference(resolved.path), tuple(resolved.manifest().labels)


class LoopWorker:
    def __init__(self, plane: Any, pool: Any, batchers: Any, settings: Any):  # plane: service/loop/plane.py LoopPlane
        self.plane = plane
        self.pool = pool
        self.batchers = batchers
        self.service_settings = settings
        self.task: asyncio.Task | None = None
        self.shadows: set[asyncio.Task] = set()
        self.drifting: asyncio.Task | None = None
        self.shadow_rows: list[tuple] = []
        self.lock = asyncio.Lock()  # one write of the queue at a time: the periodic one or a feedback's flush
        self.holder = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # this worker's name on the duties lease

    async def flush(self) -> None:
        """Write everything queued now, after any write in progress: POST /feedback calls this when
        a request id is not in the database yet, so feedback right after an answer finds its record."""
        async with self.lock:
            await self._step(len(self.plane.queue))

    async def _step(self, limit: int) -> None:
        items = self.plane.take(limit)
        self._shadow(items)
        rows, self.shadow_rows = self.shadow_rows, []
        await asyncio.to_thread(self._write, items, rows)

    def start(self) -> None:
        self.plane.refresh()
        self.task = asyncio.get_running_loop().create_task(self._run(), name="production-loop")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        for task in [*self.shadows, *([self.drifting] if self.drifting else [])]:
            task.cancel()
        await asyncio.to_thread(self._write, self.plane.take(len(self.plane.queue)))

    async def _run(self) -> None:
        s = self.plane.settings
        refreshed = drifted = time.monotonic()
        while True:
            await asyncio.sleep(s.flush_s)
            try:
                async with self.lock:
                    await self._step(1000)
                now = time.monotonic()
                if now - refreshed >= s.refresh_s:
                    await asyncio.to_thread(self.plane.refresh)
                    refreshed = now
                if now - drifted >= s.drift_interval_s and (self.drifting is None or self.drifting.done()):
                    # beside the flushes, not between them: a window's test must not hold records back
                    self.drifting = asyncio.get_running_loop().create_task(asyncio.to_thread(self._drift_safely))
                    drifted = now
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive any one bad batch
                log.exception("production loop step failed")

    # ---- after the response: records, captures, drift samples ----------------------------------
    def _write(self, items: list, shadow_rows: list[tuple] = ()) -> None:
        s, plane = self.plane.settings, self.plane
        if plane.dropped:
            loop_metrics()["dropped"].labels("-").inc(plane.dropped)
            plane.dropped = 0
        records.write_predictions(plane.db, [self._record(i) for i in items], s.max_records)
        kept = [c for c in (self._captured(i) for i in items) if c is not None]
        if kept:
            plane.captures.write(kept)
        samples = [drift.Sample(i.model, i.version, i.label, i.in_domain, i.abstained, i.embedding, i.created)
                   for i in items if plane.rng.random() < s.drift_fraction]
        drift.write_samples(plane.db, samples, s.drift_max_samples)
        rollout.write_shadow(plane.db, list(shadow_rows))

    @staticmethod
    def _record(item: Any) -> records.PredictionRecord:
        margin, entropy = records.uncertainty_of(item.probabilities)
        count_answered(item.model, item.version, 1, item.elapsed_s)
        return records.PredictionRecord(item.request_id, item.model, item.version, item.label, item.confidence,
                                        margin, entropy, item.in_domain, item.abstained, item.created)

    def _captured(self, item: Any) -> Captured | None:
        if not isinstance(item.data, bytes) or not self.plane.capturing(item.model):
            return None
        reason = capture_reason(item.abstained, item.in_domain, self.plane.capture_fraction(item.model), self.plane.rng)
        if reason is None:
            return None
        margin, entropy = records.uncertainty_of(item.probabilities)
        return Captured(item.request_id, item.model, item.version, item.data, item.label, item.confidence, margin,
                        entropy, item.in_domain, item.abstained, reason, item.embedding)

    # ---- shadow ----------------------------------------------------------------------------------
    def _shadow(self, items: list) -> None:
        for item in items:
            candidate = self.plane.shadow_of(item.model, item.version)
            if candidate is not None and item.data is not None and len(self.shadows) < 64:
                task = asyncio.get_running_loop().create_task(self._run_shadow(item, candidate))
                self.shadows.add(task)
                task.add_done_callback(self.shadows.discard)

    async def _run_shadow(self, item: Any, candidate: str) -> None:
        started = time.perf_counter()
        try:
            classifier = await self.pool.get(f"{item.model}:{candidate}")
            array = item.data if isinstance(item.data, np.ndarray) else await asyncio.to_thread(
                self._decode, item.data, classifier)
            row = await self.batchers.submit(classifier, array)
        except Exception as error:
            log.warning("shadow run of %s:%s failed: %s", item.model, candidate, error)
            return
        # agreement on the most probable label (an abstention of stable still has one)
        stable_top = item.labels[int(np.argmax(item.probabilities))]
        agree = int(classifier.manifest.labels[int(np.argmax(row.probabilities))] == stable_top)
        self.shadow_rows.append((item.model, item.version, candidate, agree, item.elapsed_s * 1000,
                                 (time.perf_counter() - started) * 1000, time.time()))

    def _decode(self, data: bytes, classifier: Any) -> np.ndarray:
        spec = classifier.manifest.preprocessing
        s = self.service_settings
        return resize_and_crop(decode_image(data, s.max_pixels, s.allowed_formats, draft_size=spec.resize), spec)

    # ---- drift, gauges, auto-promote -------------------------------------------------------------
    def _drift_safely(self) -> None:
        try:
            self.drift_pass()
        except Exception:  # the next pass tries again
            log.exception("production loop drift pass failed")

    def drift_pass(self) -> None:
        """Every worker sets its gauges from the database; only the lease holder (one worker of all)
        computes drift windows and runs auto-promote, so each window is tested once and each
        decision is made once."""
        db, s = self.plane.db, self.plane.settings
        leader = rollout.hold_lease(db, DUTIES, self.holder, max(3 * s.drift_interval_s, 10.0))
        active = db.read("SELECT model, version FROM samples GROUP BY model, version")
        for row in active:
            if leader:
                self._window(row["model"], row["version"])
            self._gauges(row["model"], row["version"])
        held = db.read("SELECT model FROM rollouts WHERE candidate IS NOT NULL")
        for model in {row["model"] for row in [*active, *held]}:
            self._accuracy_and_policy(model, leader)

    def _window(self, model: str, version: str) -> None:
        db, s = self.plane.db, self.plane.settings
        if drift.unreported(db, model, version) < s.drift_window:
            return  # windows never overlap: wait for a full one of new samples
        try:
            reference, labels = reference_of(model, version)
        except Exception as error:  # a deleted version: its samples age out
            log.info("no drift reference for %s:%s: %s", model, version, error)
            return
        report = drift.window_report(db, model, version, reference, list(labels), s.drift_window,
                                     s.drift_alpha, s.drift_permutations)
        drift.record(db, model, version, report)

    def _gauges(self, model: str, version: str) -> None:
        newest = drift.history(self.plane.db, model, version, 1)
        if not newest:
            return
        report = newest[0]
        set_gauge("drift_p_value", model, version, report["embedding"]["p_value"])
        set_gauge("drift_mmd2", model, version, report["embedding"]["mmd2"])
        set_gauge("drift_label_psi", model, version, report["labels"]["psi"])
        set_gauge("in_domain_rate", model, version, report["in_domain_rate"])
        set_gauge("abstention_rate", model, version, report["abstention_rate"])

    def _accuracy_and_policy(self, model: str, leader: bool) -> None:
        db, s = self.plane.db, self.plane.settings
        accuracy = records.live_accuracy(db, model)
        for version, live in accuracy.items():
            set_gauge("live_accuracy", model, version, live["accuracy"])
            set_gauge("live_feedback", model, version, live["count"])
        state = rollout.current(db, model)
        if state is not None and state.candidate and state.mode == "shadow":
            set_gauge("shadow_agreement", model, state.candidate,
                      rollout.shadow_summary(db, model, state.candidate)["agreement"])
        if leader and s.auto_promote and state is not None and state.candidate:
            self._auto_promote(model, state, accuracy)

    def _auto_promote(self, model: str, state: rollout.Rollout, accuracy: dict) -> None:
        s = self.plane.settings
        decided = rollout.auto_promote_decision(accuracy, state, s.auto_promote_min_feedback, s.auto_promote_margin)
        rollout.record_decision(self.plane.db, model, decided)
        if decided["decision"] != "promote":
            return
        try:  # compare-and-set: an operator may have promoted or rolled back since `state` was read
            rollout.promote(self.plane.db, model, by="auto-promote", expected=state.candidate)
        except rollout.RolloutError as error:
            log.info("auto-promote of %s:%s skipped: %s", model, state.candidate, error)
            return
        c, st = decided["candidate"], decided["stable"]
        log.info("auto-promoted %s:%s (Wilson lower %.3f on %d labels > %s's upper %.3f on %d)",
                 model, state.candidate, c["lower"], c["count"], state.stable, st["upper"], st["count"])
