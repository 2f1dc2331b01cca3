"""Drift of a served version, per window of its sampled traffic, against its export reference.

Serving workers add a bounded sample of requests (embedding, predicted label, in-domain score,
abstained) to the `samples` table off the response path. `window_report` compares the newest
`window` samples of one version that no earlier report saw with its reference
(models/artifact/reference.py). Windows never overlap: each sample is tested once, so on traffic
like the reference each window is an independent test that false-alarms with probability alpha,
and a day of windows raises about alpha × windows false alarms, never the same samples again
(`bench/loop.py --drift-day` measures it; docs/production-loop.md has the number). A report waits
until a full window of new samples has arrived.
- embeddings: MMD with a permutation p-value (service/loop/stats.py); `drifted` when p < alpha;
- the predicted-label distribution: PSI and a chi-square p-value against what the version
  predicted on its validation split;
- the in-domain rate (the reference's is 0.95 by construction) and the abstention rate.
Reports are kept per version (`drift` table, newest `HISTORY` rows) for the monitor's chart.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from models.serving.ood import IN_DOMAIN_THRESHOLD
from models.artifact.reference import Reference
from service.loop.db import LoopDb
from service.loop.stats import chi_square, distribution, mmd_test, psi

HISTORY = 500  # reports kept per version
PSI_ALERT = 0.25  # the usual "shifted" level of the population stability index


@dataclass(frozen=True)
class Sample:
    model: str
    version: str
    label: str | None
    in_domain: float | None
    abstained: bool
    embedding: np.ndarray | None
    created: float


def write_samples(db: LoopDb, samples: list[Sample], max_per_version: int) -> None:
    """Add samples; keep only the newest `max_per_version` of each version touched."""
    if not samples:
        return
    with db.write() as conn:
        conn.executemany(
            "INSERT INTO samples (model, version, created, label, in_domain, abstained, embedding) VALUES (?,?,?,?,?,?,?)",
            [(s.model, s.version, s.created, s.label, s.in_domain, int(s.abstained),
              None if s.embedding is None else np.asarray(s.embedding, np.float16).tobytes()) for s in samples],
        )
        for model, version in {(s.model, s.version) for s in samples}:
            conn.execute("DELETE FROM samples WHERE model = ? AND version = ? AND id <= "
                         "(SELECT id FROM samples WHERE model = ? AND version = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                         (model, version, model, version, max_per_version))


def latest_samples(db: LoopDb, model: str, version: str, window: int, after_id: int = 0) -> list[dict]:
    """The newest `window` samples of `model:version` with an id above `after_id`, newest first."""
    rows = db.read("SELECT * FROM samples WHERE model = ? AND version = ? AND id > ? ORDER BY id DESC LIMIT ?",
                   (model, version, after_id, window))
    return [dict(r) for r in rows]


def unreported(db: LoopDb, model: str, version: str) -> int:
    """Samples of `model:version` newer than its last report: a window is due once they fill one."""
    after = last_reported_id(db, model, version)
    return db.read("SELECT COUNT(*) AS n FROM samples WHERE model = ? AND version = ? AND id > ?",
                   (model, version, after))[0]["n"]


def rates(rows: list[dict]) -> dict[str, float | None]:
    scored = [r["in_domain"] for r in rows if r["in_domain"] is not None]
    return {
        "in_domain_rate": float(np.mean([s >= IN_DOMAIN_THRESHOLD for s in scored])) if scored else None,
        "abstention_rate": float(np.mean([bool(r["abstained"]) for r in rows])) if rows else None,
    }


def embedding_drift(rows: list[dict], reference: Reference | None, alpha: float, permutations: int) -> dict:
    vectors = [np.frombuffer(r["embedding"], np.float16) for r in rows if r["embedding"] is not None]
    if reference is None or len(vectors) < 10:
        why = "no reference (exported before drift references)" if reference is None else "fewer than 10 embeddings"
        return {"mmd2": None, "p_value": None, "drifted": None, "why": why}
    width = reference.embeddings.shape[1]
    window = np.stack([v for v in vectors if len(v) == width]).astype(np.float32)
    result = mmd_test(reference.embeddings, window, permutations)
    return {"mmd2": result.mmd2, "p_value": result.p_value, "drifted": result.p_value < alpha}


def label_drift(rows: list[dict], reference: Reference | None, labels: list[str]) -> dict:
    predicted = [r["label"] for r in rows if r["label"] is not None]
    counts = {label: predicted.count(label) for label in labels}
    if reference is None or not predicted:
        return {"predicted": counts, "psi": None, "chi2_p_value": None}
    expected = distribution(reference.predicted_counts, labels)
    observed = np.array([counts[label] for label in labels], dtype=np.float64)
    _, p_value = chi_square(expected, observed)
    value = psi(expected, distribution(counts, labels))
    return {"predicted": counts, "psi": value, "chi2_p_value": p_value, "shifted": value > PSI_ALERT}


def window_report(db: LoopDb, model: str, version: str, reference: Reference | None, labels: list[str],
                  window: int, alpha: float, permutations: int = 200, after_id: int | None = None) -> dict:
    """Drift of the newest `window` samples of `model:version` after `after_id` (default: after the
    last report's, so windows never overlap; see the module docstring)."""
    after = last_reported_id(db, model, version) if after_id is None else after_id
    rows = latest_samples(db, model, version, window, after)
    return {"version": version, "at": time.time(), "window": len(rows), "alpha": alpha,
            "newest_id": rows[0]["id"] if rows else 0, "oldest_id": rows[-1]["id"] if rows else 0,
            **rates(rows), "embedding": embedding_drift(rows, reference, alpha, permutations),
            "labels": label_drift(rows, reference, labels)}


def record(db: LoopDb, model: str, version: str, report: dict) -> bool:
    """Keep a report unless a newer one already covers its samples (two workers never both report
    one window); → whether it was kept."""
    with db.write() as conn:
        last = conn.execute("SELECT report FROM drift WHERE model = ? AND version = ? ORDER BY id DESC LIMIT 1",
                            (model, version)).fetchone()
        if last is not None and json.loads(last["report"]).get("newest_id", 0) >= report.get("oldest_id", 1):
            return False
        conn.execute("INSERT INTO drift (model, version, at, report) VALUES (?,?,?,?)",
                     (model, version, report["at"], json.dumps(report)))
        conn.execute("DELETE FROM drift WHERE model = ? AND version = ? AND id <= "
                     "(SELECT id FROM drift WHERE model = ? AND version = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                     (model, version, model, version, HISTORY))
    return True


def history(db: LoopDb, model: str, version: str, limit: int = 100) -> list[dict]:
    rows = db.read("SELECT report FROM drift WHERE model = ? AND version = ? ORDER BY id DESC LIMIT ?",
                   (model, version, limit))
    return [json.loads(r["report"]) for r in reversed(rows)]


def last_reported_id(db: LoopDb, model: str, version: str) -> int:
    """The newest sample id the last report of `model:version` saw (0 before any): samples are
    written in batches after their time stamps, so ids, not times, say what is new."""
    latest = history(db, model, version, 1)
    return latest[0].get("newest_id", 0) if latest else 0
