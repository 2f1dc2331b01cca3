"""Prediction records and feedback: what was answered, what the truth was, and live accuracy.

A prediction record is small (model, version, predicted label, confidence, margin, entropy,
in-domain score, abstained) and kept whether or not images are captured, so feedback by
`request_id` can be scored; the table is bounded (`max_records`, oldest out first).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from models.errors import TuneserveError
from service.loop.db import LoopDb
from service.loop.stats import wilson


class UnknownRequest(TuneserveError):
    status = 404


class BadFeedback(TuneserveError):
    status = 422


class FeedbackTaken(TuneserveError):
    """Another key already gave this request's true label: only that key may change it (409)."""

    status = 409


@dataclass(frozen=True)
class PredictionRecord:
    request_id: str
    model: str
    version: str
    label: str | None
    confidence: float
    margin: float | None
    entropy: float | None
    in_domain: float | None
    abstained: bool
    created: float


def uncertainty_of(probabilities: np.ndarray) -> tuple[float, float]:
    """(margin between the two most probable labels, entropy in nats) of one probability vector."""
    p = np.sort(np.asarray(probabilities, dtype=np.float64))[::-1]
    margin = float(p[0] - p[1]) if len(p) > 1 else 1.0
    positive = p[p > 0]
    return margin, float(-(positive * np.log(positive)).sum())


def write_predictions(db: LoopDb, records: list[PredictionRecord], max_records: int) -> None:
    """Insert a batch of records and drop the oldest beyond `max_records`, in one transaction."""
    if not records:
        return
    with db.write() as conn:
        conn.executemany(
            "INSERT OR REPLACE INTO predictions VALUES (:request_id, :model, :version, :label, :confidence, :margin,"
            " :entropy, :in_domain, :abstained, :created)",
            [asdict(r) for r in records],
        )
        excess = conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] - max_records
        if excess > 0:
            conn.execute("DELETE FROM predictions WHERE request_id IN "
                         "(SELECT request_id FROM predictions ORDER BY created LIMIT ?)", (excess,))


def prediction(db: LoopDb, request_id: str) -> dict | None:
    rows = db.read("SELECT * FROM predictions WHERE request_id = ?", (request_id,))
    return dict(rows[0]) if rows else None


def record_feedback(db: LoopDb, request_id: str, label: str, labels: list[str] | None, by: str | None,
                    model: str | None = None, version: str | None = None, predicted: str | None = None,
                    capture_id: str | None = None) -> dict:
    """Store the true `label` for a request (its prediction record names model and version)."""
    label = (label or "").strip()
    if not label:
        raise BadFeedback("missing 'label': the true label of the image")
    if model is None:
        found = prediction(db, request_id)
        if found is None:
            raise UnknownRequest(f"no prediction with request_id {request_id!r} (unknown, or older than the kept records)")
        model, version, predicted = found["model"], found["version"], found["label"]
        if capture_id is None and db.read("SELECT 1 FROM captures WHERE capture_id = ?", (request_id,)):
            capture_id = request_id  # the request's image was captured: the label makes it training data
    if labels is not None and label not in labels:
        raise BadFeedback(f"label {label!r} is not one of {model}'s labels: {', '.join(labels)}")
    row = {"request_id": request_id, "model": model, "version": version, "predicted": predicted, "label": label,
           "created": time.time(), "submitted_by": by, "capture_id": capture_id}
    with db.write() as conn:
        earlier = conn.execute("SELECT submitted_by FROM feedback WHERE request_id = ?", (request_id,)).fetchone()
        if earlier is not None and earlier[0] != by:  # one caller never replaces another's label
            raise FeedbackTaken(f"request {request_id} already has feedback from another key; only that key may change it")
        conn.execute("INSERT OR REPLACE INTO feedback VALUES (:request_id, :model, :version, :predicted, :label,"
                     " :created, :submitted_by, :capture_id)", row)
        if capture_id:
            conn.execute("UPDATE captures SET reviewed = ? WHERE capture_id = ?", (label, capture_id))
    return {**row, "correct": None if predicted is None else predicted == label}


def live_accuracy(db: LoopDb, model: str) -> dict[str, dict]:
    """Per version: labelled count, correct count, accuracy and its 95 % Wilson interval."""
    rows = db.read("SELECT version, COUNT(*) AS n, SUM(predicted = label) AS correct FROM feedback "
                   "WHERE model = ? AND version IS NOT NULL AND predicted IS NOT NULL GROUP BY version", (model,))
    result = {}
    for row in rows:
        n, correct = int(row["n"]), int(row["correct"] or 0)
        low, high = wilson(correct, n)
        result[row["version"]] = {"count": n, "correct": correct, "accuracy": correct / n if n else math.nan,
                                  "interval": [round(low, 4), round(high, 4)]}
    return result


def labelled(db: LoopDb, model: str) -> list[dict]:
    """Every feedback row of `model` that has a captured image (for fine-tuning from feedback)."""
    rows = db.read("SELECT f.label, c.path, f.version FROM feedback f JOIN captures c ON c.capture_id = f.capture_id "
                   "WHERE f.model = ?", (model,))
    return [dict(r) for r in rows]
