"""The loop's background task in each serving worker: everything that must not slow a response.

Every `flush_s` it drains the plane's queue and, in a thread: writes the prediction records,
stores the captures the sampling rule keeps (service/loop/capture.py) and the drift samples.
Shadow copies run on the candidate through the pool's batcher (decoded here, never through the
data plane, so they are neither recorded as answers nor shadowed again). Every `refresh_s` it
re-reads rollouts and capture switches; every `drift_interval_s` it computes each active version's
drift window, sets the gauges, and applies the auto-promote policy when it is on.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import numpy as np

from models.artifact import store
from models.serving.preprocess import decode_image, resize_and_crop
from models.artifact.reference import Reference, load_reference
from service.loop import drift, records, rollout
from service.loop.capture import Captured, capture_reason
from service.loop.metrics import count_answered, loop_metrics, set_gauge


log = logging.getLogger("tuneserve.loop")


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
        self.shadow_rows: list[tuple] = []

    def start(self) -> None:
        self.plane.refresh()
        self.task = asyncio.get_running_loop().create_task(self._run(), name="production-loop")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        for task in list(self.shadows):
            task.cancel()
        await asyncio.to_thread(self._write, self.plane.take(len(self.plane.queue)))

    async def _run(self) -> None:
        s = self.plane.settings
        refreshed = drifted = time.monotonic()
        while True:
            await asyncio.sleep(s.flush_s)
            try:
                items = self.plane.take(1000)
                self._shadow(items)
                rows, self.shadow_rows = self.shadow_rows, []
                await asyncio.to_thread(self._write, items, rows)
                now = time.monotonic()
                if now - refreshed >= s.refresh_s:
                    await asyncio.to_thread(self.plane.refresh)
                    refreshed = now
                if now - drifted >= s.drift_interval_s:
                    await asyncio.to_thread(self.drift_pass)
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
    def drift_pass(self) -> None:
        db, s = self.plane.db, self.plane.settings
        active = db.read("SELECT model, version, MAX(id) AS newest FROM samples GROUP BY model, version")
        for row in active:
            model, version = row["model"], row["version"]
            if row["newest"] > drift.last_reported_id(db, model, version):
                try:
                    reference, labels = reference_of(model, version)
                except Exception as error:  # a deleted version: its samples age out
                    log.info("no drift reference for %s:%s: %s", model, version, error)
                    continue
                report = drift.window_report(db, model, version, reference, list(labels), s.drift_window,
                                             s.drift_alpha, s.drift_permutations)
                drift.record(db, model, version, report)
                self._gauges(model, version, report)
        for model in {row["model"] for row in active}:
            self._accuracy_and_policy(model)

    @staticmethod
    def _gauges(model: str, version: str, report: dict) -> None:
        set_gauge("drift_p_value", model, version, report["embedding"]["p_value"])
        set_gauge("drift_mmd2", model, version, report["embedding"]["mmd2"])
        set_gauge("drift_label_psi", model, version, report["labels"]["psi"])
        set_gauge("in_domain_rate", model, version, report["in_domain_rate"])
        set_gauge("abstention_rate", model, version, report["abstention_rate"])

    def _accuracy_and_policy(self, model: str) -> None:
        db, s = self.plane.db, self.plane.settings
        accuracy = records.live_accuracy(db, model)
        for version, live in accuracy.items():
            set_gauge("live_accuracy", model, version, live["accuracy"])
            set_gauge("live_feedback", model, version, live["count"])
        state = rollout.current(db, model)
        if state is not None and state.candidate and state.mode == "shadow":
            set_gauge("shadow_agreement", model, state.candidate,
                      rollout.shadow_summary(db, model, state.candidate)["agreement"])
        if s.auto_promote and state is not None and rollout.should_auto_promote(
                accuracy, state, s.auto_promote_min_feedback, s.auto_promote_margin):
            rollout.promote(db, model, by="auto-promote",
                            reason=f"was stable: {state.stable}")
            log.info("auto-promoted %s:%s (live accuracy no worse than %s)", model, state.candidate, state.stable)
