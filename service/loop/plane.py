"""The production loop inside one serving worker: what the data plane calls, and nothing slow.

The data plane (service/dataplane.py) calls three things per request, all cheap and in memory:
- `route(ref)`: an un-pinned model name → `name:version` by the model's rollout (canary split,
  sticky per client id from `client_id_var`); a pinned ref is returned as it is;
- `wants_embedding(classifier)`: whether to fetch the embedding output in the same pass (drift
  samples and captures need it; the in-domain score computes it anyway);
- `observe(...)`: queue what was answered; returns at once.
Everything else (prediction records, capture, drift samples, shadow runs, database writes) happens
in `LoopWorker` (service/loop/worker.py), after the response, on a bounded queue: when the queue is
full, observations are dropped and counted, never waited for.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.artifact import store
from models.serving.runtime import OnnxClassifier
from service.loop import rollout as rollouts
from service.loop.capture import CaptureLimits, CaptureStore
from service.loop.db import LoopDb
from service.loop.settings import LoopSettings
from service.names import CALLER_ID_HELP as CLIENT_ID_HELP, CLIENT_ID, new_request_id
from service.limits import json_error

log = logging.getLogger("tuneserve.loop")
# The caller's client id (header `X-Client-Id`), set per request by `client_id_middleware`.
client_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("tuneserve_client_id", default=None)


@dataclass
class Observed:
    """One answered image, queued for the loop."""

    request_id: str
    model: str
    version: str
    probabilities: np.ndarray
    label: str | None
    confidence: float
    abstained: bool
    in_domain: float | None
    embedding: np.ndarray | None
    data: bytes | np.ndarray | None  # the upload (encoded bytes, or uint8 pixels) for capture and shadow
    elapsed_s: float
    labels: tuple[str, ...] | list[str] = ()  # the answering version's labels, in output order
    created: float = field(default_factory=time.time)


def request_ids(base: str, count: int) -> list[str]:
    """One id per image: the server's `base`, suffixed `-i` in a batch."""
    return [base] if count == 1 else [f"{base}-{i}" for i in range(count)]


class LoopPlane:
    """Per-worker front of the loop; see the module docstring."""

    def __init__(self, settings: Any, loop_settings: LoopSettings | None = None):
        self.settings = loop_settings or LoopSettings.of(settings)
        self.service_settings = settings
        self.worker = None
        self.default_model = settings.default_model
        self.db = LoopDb(settings.home)
        s = self.settings
        self.captures = CaptureStore(self.db, settings.home, CaptureLimits(
            s.capture_max_bytes, s.capture_max_items, s.capture_max_age_seconds, s.capture_min_free_bytes))
        self.queue: deque[Observed] = deque()
        self.dropped = 0
        self.rng = random.Random()
        self.rollouts: dict[str, rollouts.Rollout] = {}
        self.switches: dict[str, tuple[bool, float | None]] = {}  # model → (capture on, fraction)

    # ---- called on the request path (memory only) --------------------------------------------
    def route(self, ref: str | None) -> str | None:
        """`ref` as the rollout routes it: pinned refs and models without a rollout are unchanged."""
        name, version = store.split_ref((ref or self.default_model).strip())
        state = self.rollouts.get(name)
        if version != "latest" or state is None:
            return ref
        answering, _ = rollouts.choose(state, client_id_var.get(), self.rng)
        return f"{name}:{answering}"

    def shadow_of(self, model: str, version: str) -> str | None:
        """The candidate to run on a copy of a request that `model:version` answered, if it is a shadowed stable."""
        state = self.rollouts.get(model)
        if state is None or state.mode != "shadow" or state.candidate is None or state.stable != version:
            return None
        return state.candidate

    def wants_embedding(self, classifier: OnnxClassifier) -> bool:
        return classifier.has_embedding and (self.capturing(classifier.name) or self.settings.drift_fraction > 0)

    def capturing(self, model: str) -> bool:
        switch = self.switches.get(model)
        if switch is not None:
            return switch[0]
        return "*" in self.settings.capture_models or model in self.settings.capture_models

    def capture_fraction(self, model: str) -> float:
        switch = self.switches.get(model)
        return switch[1] if switch is not None and switch[1] is not None else self.settings.capture_fraction

    def observe(self, items: list[Observed]) -> None:
        """Queue answered images for the loop; drops (and counts) what a full queue cannot hold."""
        room = self.settings.queue_size - len(self.queue)
        self.queue.extend(items[: max(0, room)])
        self.dropped += max(0, len(items) - max(0, room))

    def take(self, limit: int) -> list[Observed]:
        taken = []
        while self.queue and len(taken) < limit:
            taken.append(self.queue.popleft())
        return taken

    # ---- refreshed off the request path ---------------------------------------------------------
    def refresh(self) -> None:
        """Re-read rollouts and capture switches (shared by every worker) from the database."""
        self.rollouts = {row["model"]: rollouts.Rollout(**dict(row)) for row in self.db.read("SELECT * FROM rollouts")}
        self.switches = {row["model"]: (bool(row["capture"]), row["fraction"])
                         for row in self.db.read("SELECT model, capture, fraction FROM switches")}

    def set_capture(self, model: str, enabled: bool, fraction: float | None, by: str | None) -> dict:
        with self.db.write() as conn:
            conn.execute("INSERT OR REPLACE INTO switches VALUES (?,?,?,?,?)",
                         (model, int(enabled), fraction, time.time(), by))
        self.refresh()
        return {"model": model, "capture": enabled, "fraction": self.capture_fraction(model), "updated_by": by}

    # ---- the data plane's two calls around one inference -----------------------------------------
    def outputs_for(self, outputs: frozenset[str], classifier: OnnxClassifier, top_k: int) -> frozenset[str]:
        """The outputs to compute for a classification (`top_k` > 0): the caller's, plus probabilities
        (margin, entropy) and, when the loop wants it, the embedding, fetched in the same pass."""
        if top_k <= 0:
            return outputs
        return outputs | {"probabilities"} | ({"embedding"} if self.wants_embedding(classifier) else set())

    def after(self, asked: frozenset[str], top_k: int, inputs: Any, result: Any) -> None:
        """Give each classified image its `request_id`, queue it for the loop, and drop the outputs
        the caller did not ask for. Classifications only (`top_k` > 0): evaluation and raw tensor
        calls are not served answers."""
        if top_k <= 0:
            return
        try:
            self._after(asked, inputs, result)
        except Exception:  # the loop must never fail an answer
            log.exception("production loop: could not queue an answer of %s", result.classifier.tag)

    def _after(self, asked: frozenset[str], inputs: Any, result: Any) -> None:
        # Records, captures and feedback are keyed by ids the server makes, never by the caller's own
        # id (which is only echoed): no caller can name a file or replace another caller's record.
        base = new_request_id()
        ids = request_ids(base, len(result.images))
        result.id = result.id or base  # a batch's images are `<base>-0`, `<base>-1`, …
        result.request_ids = ids
        classifier, items = result.classifier, []
        for index, (image, request_id) in enumerate(zip(result.images, ids)):
            if image.error is not None or image.probabilities is None or image.prediction is None:
                continue
            prediction = image.prediction = image.prediction.model_copy(update={"request_id": request_id})
            items.append(Observed(
                request_id, classifier.name, classifier.version, image.probabilities, prediction.label,
                prediction.probability, prediction.abstained, image.in_domain, image.embedding,
                None if inputs is None else inputs[index], result.elapsed_s, classifier.manifest.labels))
            for name in ("probabilities", "embedding"):
                if name not in asked:
                    setattr(image, name, None)
        self.observe(items)

    # ---- the background worker, started on first use inside the serving event loop -------------
    def ensure_worker(self, pool: Any, batchers: Any) -> None:
        """Start this process's `LoopWorker` (records, capture, drift, shadow) once: shadow runs take their
        model from `pool` and go through the data plane's `batchers`, like any request."""
        task = self.worker.task if self.worker is not None else None
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            from service.loop.worker import LoopWorker  # (again when an earlier event loop, e.g. a test's, is gone)

            self.worker = LoopWorker(self, pool, batchers, self.service_settings)
            self.worker.start()

    async def flush(self) -> bool:
        """Write this worker's queued records now (see LoopWorker.flush); False when its worker is
        not running in this event loop (nothing was answered here yet)."""
        task = self.worker.task if self.worker is not None else None
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            return False
        await self.worker.flush()
        return True


_PLANES: dict[str, LoopPlane] = {}


def loop_for(settings: Any) -> LoopPlane:
    """This process's loop for the service home in `settings` (one per worker process)."""
    key = str(settings.home)
    if key not in _PLANES:
        _PLANES[key] = LoopPlane(settings)
    return _PLANES[key]


class ClientIdMiddleware:
    """Pure ASGI: the `X-Client-Id` header into `client_id_var`, for sticky canary routing."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        value = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-client-id"), None)
        if value and not CLIENT_ID.fullmatch(value):  # it keys sticky routing: one rule for caller names
            return await json_error(send, 400, f"X-Client-Id is not valid: {CLIENT_ID_HELP}")
        token = client_id_var.set(value or None)
        try:
            await self.app(scope, receive, send)
        finally:
            client_id_var.reset(token)
