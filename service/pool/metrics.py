"""Prometheus metrics of the serving workers: one per stage (decode, queue wait, inference), as
KServe's model server does, plus requests, images, batch sizes, hot reloads, and the pool's
bound: model load times, evictions and the versions held.

prometheus_client is imported on first use, not at module import: BentoML workers set
PROMETHEUS_MULTIPROC_DIR after importing the service module, and prometheus_client picks
single- or multi-process mode when it is first imported. Metrics registered in the default
registry then show in BentoML's /metrics, summed over workers.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("tuneserve.service")

_METRICS: dict[str, Any] | None = None
_LOAD_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def metrics() -> dict[str, Any]:
    """The metric objects by short name, created once per process."""
    global _METRICS
    if _METRICS is None:
        from prometheus_client import Counter, Gauge, Histogram

        _METRICS = {
            "requests": Counter(
                "tuneserve_requests", "Requests per route, model and outcome", ["route", "model", "outcome"]
            ),
            "images": Counter("tuneserve_images", "Images classified", ["model"]),
            "decode": Histogram(
                "tuneserve_decode_seconds", "Decode, check and resize of one image", ["model"], buckets=_SECONDS
            ),
            "queue": Histogram(
                "tuneserve_queue_seconds", "Time one image waits in its model's batch queue", ["model"], buckets=_SECONDS
            ),
            "latency": Histogram(
                "tuneserve_inference_seconds", "ONNX Runtime time per batch", ["model"], buckets=_SECONDS
            ),
            "batch": Histogram(
                "tuneserve_batch_size",
                "Images per ONNX Runtime call",
                ["model"],
                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            ),
            "reloads": Counter("tuneserve_model_reloads", "Hot reloads of a new latest version", ["model"]),
            # the pool's bound (service/pool/registry.py): cold loads, evictions, versions held
            "load": Histogram("tuneserve_model_load_seconds",
                              "Time to load one model version (reason: request = a cold load on first use, preload, reload)",
                              ["reason"], buckets=_LOAD_SECONDS),
            "evictions": Counter("tuneserve_model_evictions", "Model versions unloaded to stay within max_loaded_models"),
            "loaded": Gauge("tuneserve_models_loaded", "Model versions a worker holds (the most of any live worker)",
                            multiprocess_mode="livemax"),
            "shed": Counter("tuneserve_shed", "Requests or images refused with 503 under overload (service/admission.py)",
                            ["surface", "reason"]),
        }
    return _METRICS


def count_request(route: str, model: str, outcome: str) -> None:
    """One request of `route` for `model` ended with `outcome` (ok, partial, refused)."""
    try:
        metrics()["requests"].labels(route, model, outcome).inc()
    except Exception:  # metrics must never fail a request
        log.exception("could not count a %s request", route)


def observe(name: str, model: str, value: float) -> None:
    """Record `value` in histogram `name` for `model`; never raises."""
    try:
        metrics()[name].labels(model).observe(value)
    except Exception:  # metrics must never strand a request
        log.exception("could not record metric %s for %s", name, model)


def observe_load(reason: str, seconds: float) -> None:
    """One model version loaded in `seconds` (reason: request, preload or reload); never raises."""
    try:
        metrics()["load"].labels(reason).observe(seconds)
    except Exception:
        log.exception("could not record a model load")


def set_loaded(count: int) -> None:
    """How many model versions this worker holds now; never raises."""
    try:
        metrics()["loaded"].set(count)
    except Exception:
        log.exception("could not record the loaded model count")
