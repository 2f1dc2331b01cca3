"""The review queue: captured, unlabelled images ranked by how much a label would teach.

Uncertainty first: `1 - margin` (a close call between the two most probable labels) plus how
untypical the image is (`1 - in_domain`), abstentions first among equals. Then near-duplicates are
spread out (maximal marginal relevance): each next item is the one whose uncertainty, minus
`diversity` times its highest cosine similarity to an item already chosen, is largest, so ten
frames of the same scene do not fill the top of the queue.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.loop.db import LoopDb

DIVERSITY = 0.5  # weight of similarity to what is already chosen; 0 = rank by uncertainty alone


@dataclass(frozen=True)
class Candidate:
    capture_id: str
    version: str
    label: str | None
    confidence: float
    margin: float | None
    in_domain: float | None
    abstained: bool
    reason: str
    created: float
    embedding: np.ndarray | None


def uncertainty(candidate: Candidate) -> float:
    """0 (sure and typical) .. 2 (a coin toss on an image unlike the training data)."""
    margin = 1.0 if candidate.margin is None else candidate.margin
    in_domain = 1.0 if candidate.in_domain is None else candidate.in_domain
    return (1.0 - margin) + (1.0 - in_domain)


def rank(candidates: list[Candidate], limit: int, diversity: float = DIVERSITY) -> list[tuple[Candidate, float]]:
    """The `limit` candidates in review order, each with its uncertainty."""
    if not candidates:
        return []
    scores = np.array([uncertainty(c) + (1e-6 if c.abstained else 0.0) for c in candidates])
    vectors = _unit_vectors(candidates)
    closest = np.zeros(len(candidates))  # highest similarity to an item already chosen
    open_ = np.ones(len(candidates), dtype=bool)
    chosen: list[int] = []
    while open_.any() and len(chosen) < limit:
        adjusted = np.where(open_, scores - diversity * closest, -np.inf)
        best = int(np.argmax(adjusted))  # ties: the earlier (newer) capture
        chosen.append(best)
        open_[best] = False
        closest = np.maximum(closest, vectors @ vectors[best])
    return [(candidates[i], float(scores[i])) for i in chosen]


def _unit_vectors(candidates: list[Candidate]) -> np.ndarray:
    """Unit embeddings, a zero row where a candidate has none (similar to nothing)."""
    width = next((len(c.embedding) for c in candidates if c.embedding is not None), 1)
    rows = np.zeros((len(candidates), width))
    for i, c in enumerate(candidates):
        if c.embedding is not None and len(c.embedding) == width:
            rows[i] = c.embedding
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.where(norms > 0, rows / np.maximum(norms, 1e-12), 0.0)


def candidates(db: LoopDb, model: str, pool_size: int = 2000) -> list[Candidate]:
    """The newest `pool_size` unreviewed captures of `model`."""
    rows = db.read("SELECT * FROM captures WHERE model = ? AND reviewed IS NULL ORDER BY created DESC LIMIT ?",
                   (model, pool_size))
    return [Candidate(r["capture_id"], r["version"], r["label"], r["confidence"], r["margin"], r["in_domain"],
                      bool(r["abstained"]), r["reason"], r["created"],
                      None if r["embedding"] is None else np.frombuffer(r["embedding"], np.float16))
            for r in rows]


def skip(db: LoopDb, model: str, capture_id: str) -> bool:
    """Take an image out of the queue without a label (kept, marked skipped)."""
    with db.write() as conn:
        changed = conn.execute("UPDATE captures SET reviewed = '' WHERE model = ? AND capture_id = ?",
                               (model, capture_id)).rowcount
    return changed > 0
