"""`monitor(loop, model)`: what GET /models/{name}/monitor answers, from the shared database and
the store: per version its held-out accuracy (eval.json) beside its live accuracy on feedback,
the newest drift window and the drift history (the console's chart); the rollout and its events,
shadow agreement, capture counts."""
from __future__ import annotations

from typing import Any

from models.artifact import store
from service.loop import drift, records
from service.loop import rollout as rollouts
from service.loop.plane import LoopPlane

HISTORY_POINTS = 60


def _eval_accuracy(model: str, version: str) -> float | None:
    try:
        report = store.resolve(f"{model}:{version}").eval_report()
    except Exception:  # a deleted version keeps its live numbers
        return None
    return None if not report else report.get("accuracy")


def monitor(loop: LoopPlane, model: str) -> dict[str, Any]:
    db = loop.db
    live = records.live_accuracy(db, model)
    sampled = [r["version"] for r in db.read("SELECT DISTINCT version FROM samples WHERE model = ?", (model,))]
    answered = [r["version"] for r in db.read("SELECT DISTINCT version FROM predictions WHERE model = ?", (model,))]
    state = rollouts.current(db, model)
    held = [state.stable, state.candidate] if state else []
    latest = store.latest_version(model)
    versions = {}
    for version in dict.fromkeys(v for v in [latest, *held, *answered, *sampled, *live] if v):
        series = drift.history(db, model, version, HISTORY_POINTS)
        counts = db.read("SELECT COUNT(*) AS n FROM predictions WHERE model = ? AND version = ?", (model, version))
        versions[version] = {
            "eval_accuracy": _eval_accuracy(model, version),
            "live": live.get(version, {"count": 0, "correct": 0, "accuracy": None, "interval": [0.0, 1.0]}),
            "answered": counts[0]["n"],
            "drift": series[-1] if series else None,
            "history": [_point(r) for r in series],
        }
    shadow = rollouts.shadow_summary(db, model, state.candidate) if state and state.mode == "shadow" else None
    return {
        "model": model,
        "serving": {"latest": latest, "rollout": state.public() if state else None},
        "versions": versions,
        "shadow": shadow,
        "captures": {**loop.captures.counts(model), "enabled": loop.capturing(model),
                     "fraction": loop.capture_fraction(model)},
        "events": rollouts.events(db, model),
    }


def _point(report: dict) -> dict[str, Any]:
    """One drift window, flattened for a chart."""
    return {"at": report["at"], "window": report["window"], "p_value": report["embedding"]["p_value"],
            "mmd2": report["embedding"]["mmd2"], "drifted": report["embedding"]["drifted"],
            "psi": report["labels"]["psi"], "in_domain_rate": report["in_domain_rate"],
            "abstention_rate": report["abstention_rate"]}
