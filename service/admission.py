"""Admission control: under overload a worker refuses fast (503 + Retry-After) instead of queueing.

Three bounds, each answered at once, never by waiting:
- `Admission`: inference requests in flight per worker (HTTP and gRPC share it). `AdmissionMiddleware`
  checks it before the body is read, so a refused request costs a few microseconds of the event
  loop and `/livez` and `/readyz` stay fast during a burst.
- the micro-batch queue of each model (service/batching.py): `max_queued_images`;
- a deadline per queued image: an image that waited longer than `request_deadline_s` is answered
  503 and never runs (its caller has most likely given up).
gRPC has its own cap on concurrent calls (`grpc_max_concurrent_calls`, answered by gRPC itself).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator

from models.errors import TuneserveError
from service.limits import json_error
from service.pool.metrics import metrics

# The routes that run inference: only these are counted and shed (health, metrics, jobs never are).
INFERENCE_PATHS = re.compile(r"^/(classify|classify_batch|evaluate|v2/models/[^/]+(/versions/[^/]+)?/infer)/?$")


class Overloaded(TuneserveError):
    """This worker is at a bound: try again in `retry_after_s` (503; gRPC RESOURCE_EXHAUSTED)."""

    status = 503

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Admission:
    """Inference requests in flight in one worker process, at most `limit`."""

    def __init__(self, limit: int, retry_after_s: int = 1):
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.inflight = 0

    def refusal(self) -> Overloaded:
        return Overloaded(f"overloaded: this worker is answering {self.inflight} inference requests, its limit "
                          f"(TUNESERVE_MAX_INFLIGHT_REQUESTS={self.limit}); retry after {self.retry_after_s} s",
                          self.retry_after_s)

    @property
    def full(self) -> bool:
        return self.inflight >= self.limit

    @contextmanager
    def admitted(self, surface: str) -> Iterator[None]:
        """Hold one place for the block, or raise Overloaded at once. The event loop is single-threaded,
        so the check and the count need no lock."""
        if self.full:
            shed(surface, "inflight")
            raise self.refusal()
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1


def shed(surface: str, reason: str) -> None:
    try:
        metrics()["shed"].labels(surface, reason).inc()
    except Exception:  # a metric must never turn a 503 into a 500
        pass


class AdmissionMiddleware:
    """Pure ASGI: an inference request over `admission`'s limit is answered 503 before its body is read."""

    def __init__(self, app: Any, admission: Admission):
        self.app = app
        self.admission = admission

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not INFERENCE_PATHS.match(scope.get("path", "")):
            return await self.app(scope, receive, send)
        if self.admission.full:  # refused before the body is read (the app's own 503s are its own answers)
            shed("http", "inflight")
            refused = self.admission.refusal()
            return await json_error(send, 503, str(refused), ((b"retry-after", str(refused.retry_after_s).encode()),))
        with self.admission.admitted("http"):
            await self.app(scope, receive, send)
