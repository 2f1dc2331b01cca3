"""Prometheus metrics of the loop, per model and version: requests and latency by the version that
answered, drift statistics of the newest window, live accuracy and shadow agreement.

Gauges are set by every worker from the shared database, so `mostrecent` gives one value per
series however many workers there are. Created on first use (see service/pool/metrics.py for why).
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("tuneserve.loop")
_METRICS: dict[str, Any] | None = None
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
GAUGES = {
    "drift_p_value": "Permutation p-value of the embedding MMD test on the newest window",
    "drift_mmd2": "Squared MMD of the newest window's embeddings against the export reference",
    "drift_label_psi": "PSI of the newest window's predicted labels against the reference's",
    "in_domain_rate": "Share of the newest window's images in domain",
    "abstention_rate": "Share of the newest window's answers that abstained",
    "live_accuracy": "Accuracy on labelled feedback",
    "live_feedback": "Labelled feedback count",
    "shadow_agreement": "Share of shadowed requests where the candidate's label matched stable's",
}


def loop_metrics() -> dict[str, Any]:
    global _METRICS
    if _METRICS is None:
        from prometheus_client import Counter, Gauge, Histogram

        _METRICS = {
            "version_requests": Counter("tuneserve_version_images", "Images answered per model version",
                                        ["model", "version"]),
            "version_latency": Histogram("tuneserve_version_seconds", "Inference request time per model version",
                                         ["model", "version"], buckets=_SECONDS),
            "dropped": Counter("tuneserve_loop_dropped", "Observations dropped by a full loop queue", ["model"]),
            **{name: Gauge(f"tuneserve_{name}", text, ["model", "version"], multiprocess_mode="mostrecent")
               for name, text in GAUGES.items()},
        }
    return _METRICS


def set_gauge(name: str, model: str, version: str, value: float | None) -> None:
    if value is None:
        return
    try:
        loop_metrics()[name].labels(model, version).set(float(value))
    except Exception:  # metrics must never break the loop
        log.exception("could not set %s", name)


def count_answered(model: str, version: str, images: int, seconds: float) -> None:
    try:
        m = loop_metrics()
        m["version_requests"].labels(model, version).inc(images)
        m["version_latency"].labels(model, version).observe(seconds)
    except Exception:
        log.exception("could not count answers of %s:%s", model, version)
