"""Rollouts: a candidate version beside the stable one, as a canary or in shadow; promote, roll back.

Once a model has a rollout row, un-pinned requests for it are routed by that row, not by the
store's `latest`: `stable` answers, except that a canary sends `percent` % of un-pinned traffic to
`candidate` (sticky per client id: the same id always lands on the same side; without an id, a
random draw). Shadow mode answers with stable and runs the candidate on a copy off the response
path. A request pinned to `name:version` always gets that version. Every change is an event
naming who made it. The row is shared by all workers (SQLite); each worker re-reads it at most
every `refresh_s`.
"""
from __future__ import annotations

import hashlib
import random
import time
from dataclasses import asdict, dataclass

from models.errors import TuneserveError
from service.loop.db import LoopDb
from service.loop.stats import wilson

MODES = ("canary", "shadow")


class RolloutError(TuneserveError):
    status = 409


@dataclass(frozen=True)
class Rollout:
    model: str
    stable: str
    candidate: str | None = None
    mode: str | None = None
    percent: float = 0.0
    updated: float = 0.0
    updated_by: str | None = None

    def public(self) -> dict:
        return asdict(self)


def bucket(client_id: str, model: str) -> float:
    """A client's fixed place in [0, 100) for `model`: the same id always gets the same side."""
    digest = hashlib.sha256(f"{model}\0{client_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def choose(rollout: Rollout, client_id: str | None, rng: random.Random) -> tuple[str, str | None]:
    """(version that answers, version to shadow or None) for one un-pinned request."""
    if rollout.candidate is None:
        return rollout.stable, None
    if rollout.mode == "shadow":
        return rollout.stable, rollout.candidate
    place = bucket(client_id, rollout.model) if client_id else rng.random() * 100
    return (rollout.candidate if place < rollout.percent else rollout.stable), None


def current(db: LoopDb, model: str) -> Rollout | None:
    rows = db.read("SELECT * FROM rollouts WHERE model = ?", (model,))
    return Rollout(**dict(rows[0])) if rows else None


def _save(conn, rollout: Rollout, action: str, version: str | None, detail: str) -> Rollout:
    conn.execute("INSERT OR REPLACE INTO rollouts VALUES (?,?,?,?,?,?,?)",
                 (rollout.model, rollout.stable, rollout.candidate, rollout.mode, rollout.percent, rollout.updated,
                  rollout.updated_by))
    conn.execute("INSERT INTO events (model, action, version, detail, by, at) VALUES (?,?,?,?,?,?)",
                 (rollout.model, action, version, detail, rollout.updated_by, rollout.updated))
    return rollout


def start(db: LoopDb, model: str, candidate: str, mode: str, percent: float, serving: str, by: str | None) -> Rollout:
    """Make `candidate` a canary or shadow of the stable version (`serving` when none is held yet)."""
    if mode not in MODES:
        raise RolloutError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if not 0 <= percent <= 100:
        raise RolloutError(f"percent must be between 0 and 100, not {percent}")
    with db.write() as conn:
        row = conn.execute("SELECT stable FROM rollouts WHERE model = ?", (model,)).fetchone()
        stable = row["stable"] if row else serving
        if candidate == stable:
            raise RolloutError(f"{model}:{candidate} is already the stable version")
        rollout = Rollout(model, stable, candidate, mode, percent if mode == "canary" else 0.0, time.time(), by)
        return _save(conn, rollout, "rollout", candidate, f"{mode} {rollout.percent:g}% beside {stable}")


def promote(db: LoopDb, model: str, by: str | None, reason: str = "") -> Rollout:
    """The candidate becomes stable and takes all un-pinned traffic."""
    with db.write() as conn:
        rollout = _current(conn, model)
        if rollout is None or rollout.candidate is None:
            raise RolloutError(f"{model} has no candidate to promote; start one with POST /models/{model}/rollout")
        promoted = Rollout(model, rollout.candidate, None, None, 0.0, time.time(), by)
        return _save(conn, promoted, "promote", rollout.candidate, reason or f"was stable: {rollout.stable}")


def rollback(db: LoopDb, model: str, by: str | None) -> Rollout:
    """Drop the candidate; with none, go back to the stable version before the last promotion."""
    with db.write() as conn:
        rollout = _current(conn, model)
        if rollout is None:
            raise RolloutError(f"{model} has no rollout to roll back")
        if rollout.candidate is not None:
            back = Rollout(model, rollout.stable, None, None, 0.0, time.time(), by)
            return _save(conn, back, "rollback", rollout.candidate, f"candidate dropped; stable stays {rollout.stable}")
        previous = conn.execute("SELECT detail FROM events WHERE model = ? AND action = 'promote' AND version = ? "
                                "ORDER BY id DESC LIMIT 1", (model, rollout.stable)).fetchone()
        if previous is None or not previous["detail"].startswith("was stable: "):
            raise RolloutError(f"{model}: nothing to roll back to (no candidate, no earlier promotion of {rollout.stable})")
        earlier = previous["detail"].removeprefix("was stable: ")
        back = Rollout(model, earlier, None, None, 0.0, time.time(), by)
        return _save(conn, back, "rollback", earlier, f"{rollout.stable} rolled back to {earlier}")


def _current(conn, model: str) -> Rollout | None:
    row = conn.execute("SELECT * FROM rollouts WHERE model = ?", (model,)).fetchone()
    return Rollout(**dict(row)) if row else None


def events(db: LoopDb, model: str, limit: int = 50) -> list[dict]:
    rows = db.read("SELECT action, version, detail, by, at FROM events WHERE model = ? ORDER BY id DESC LIMIT ?",
                   (model, limit))
    return [dict(r) for r in rows]


def write_shadow(db: LoopDb, rows: list[tuple]) -> None:
    """(model, stable, candidate, agree, stable_ms, candidate_ms, created) rows; newest 100 000 kept."""
    if not rows:
        return
    with db.write() as conn:
        conn.executemany("INSERT INTO shadow (model, stable, candidate, agree, stable_ms, candidate_ms, created) "
                         "VALUES (?,?,?,?,?,?,?)", rows)
        conn.execute("DELETE FROM shadow WHERE id <= (SELECT MAX(id) FROM shadow) - 100000")


def shadow_summary(db: LoopDb, model: str, candidate: str) -> dict:
    row = db.read("SELECT COUNT(*) AS n, SUM(agree) AS agree, AVG(stable_ms) AS stable_ms, "
                  "AVG(candidate_ms) AS candidate_ms FROM shadow WHERE model = ? AND candidate = ?",
                  (model, candidate))[0]
    n = row["n"] or 0
    low, high = wilson(int(row["agree"] or 0), n)
    return {"requests": n, "agreement": (row["agree"] or 0) / n if n else None, "interval": [low, high],
            "stable_ms": row["stable_ms"], "candidate_ms": row["candidate_ms"]}


def should_auto_promote(accuracy: dict[str, dict], rollout: Rollout, min_count: int, margin: float) -> bool:
    """The candidate's live accuracy is no worse than stable's minus `margin`, both on >= `min_count` labels."""
    if rollout.candidate is None:
        return False
    stable, candidate = accuracy.get(rollout.stable), accuracy.get(rollout.candidate)
    if not stable or not candidate or min(stable["count"], candidate["count"]) < min_count:
        return False
    return candidate["accuracy"] >= stable["accuracy"] - margin
