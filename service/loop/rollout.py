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
import json
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


def _expect(model: str, expected: str | None, actual: str | None, what: str) -> None:
    """Compare-and-set: refuse (409, naming the actual version) when the caller expected another one."""
    if expected is not None and expected != actual:
        raise RolloutError(f"{model}: expected {what} {expected!r}, but it is {actual or 'none'}; nothing was changed")


def promote(db: LoopDb, model: str, by: str | None, reason: str = "", expected: str | None = None) -> Rollout:
    """The candidate becomes stable and takes all un-pinned traffic; with `expected`, only if that
    is still the candidate (two operators, or an operator and auto-promote, never cross)."""
    with db.write() as conn:
        rollout = _current(conn, model)
        _expect(model, expected, rollout.candidate if rollout else None, "the candidate")
        if rollout is None or rollout.candidate is None:
            raise RolloutError(f"{model} has no candidate to promote; start one with POST /models/{model}/rollout")
        promoted = Rollout(model, rollout.candidate, None, None, 0.0, time.time(), by)
        return _save(conn, promoted, "promote", rollout.candidate, reason or f"was stable: {rollout.stable}")


def rollback(db: LoopDb, model: str, by: str | None, versions: list[str] | None = None,
             expected: str | None = None) -> tuple[Rollout, str]:
    """Return traffic to an earlier version; → (the rollout now, the version rolled back).

    With a candidate: drop it (stable stays). Without one: the stable version before the last
    promotion of the serving one, else the version published before it (`versions`: the model's
    versions, newest first; the first is `latest`, which serves when there is no rollout yet). Every
    version stays in the store. `expected` (compare-and-set) names the version the caller means to
    roll back: the candidate, or, with none, the serving version."""
    versions = list(versions or [])
    with db.write() as conn:
        rollout = _current(conn, model)
        serving = rollout.stable if rollout else (versions[0] if versions else None)
        rolled = rollout.candidate if rollout and rollout.candidate else serving
        _expect(model, expected, rolled, "to roll back")
        if rollout is not None and rollout.candidate is not None:
            back = Rollout(model, rollout.stable, None, None, 0.0, time.time(), by)
            detail = f"candidate dropped; stable stays {rollout.stable}"
            return _save(conn, back, "rollback", rollout.candidate, detail), rollout.candidate
        if serving is None:
            raise RolloutError(f"{model} has no version to roll back")
        promoted_from = _promoted_from(conn, model, serving)
        if versions and promoted_from not in versions:
            promoted_from = None  # deleted since: never route traffic to a version that is gone
        earlier = promoted_from or _published_before(versions, serving)
        if earlier is None:
            raise RolloutError(f"{model}: nothing to roll back to ({serving} has no earlier promotion or version)")
        back = Rollout(model, earlier, None, None, 0.0, time.time(), by)
        detail = f"{serving} rolled back to {earlier} ({serving} stays stored: roll it out again to serve it)"
        return _save(conn, back, "rollback", earlier, detail), serving


def _promoted_from(conn, model: str, version: str) -> str | None:
    """The stable version the newest promotion of `version` replaced, if it was promoted."""
    row = conn.execute("SELECT detail FROM events WHERE model = ? AND action = 'promote' AND version = ? "
                       "ORDER BY id DESC LIMIT 1", (model, version)).fetchone()
    return row["detail"].removeprefix("was stable: ") if row and row["detail"].startswith("was stable: ") else None


def _published_before(versions: list[str], version: str) -> str | None:
    """The version published just before `version` (`versions` newest first)."""
    index = versions.index(version) if version in versions else len(versions)
    return versions[index + 1] if index + 1 < len(versions) else None


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


def auto_promote_decision(accuracy: dict[str, dict], rollout: Rollout, min_count: int, margin: float) -> dict:
    """Whether to promote the candidate, on intervals, not point estimates: both versions need
    `min_count` labelled answers, and the candidate's 95 % Wilson lower bound must be above stable's
    Wilson upper bound (less `margin`). → {"decision": "promote" | "hold" | "wait", and the numbers}."""
    def numbers(version: str | None) -> dict:
        live = accuracy.get(version or "", {})
        count, correct = int(live.get("count", 0)), int(live.get("correct", 0))
        low, high = wilson(correct, count)
        return {"version": version, "count": count, "correct": correct, "lower": round(low, 4), "upper": round(high, 4)}

    candidate, stable = numbers(rollout.candidate), numbers(rollout.stable)
    if rollout.candidate is None or min(candidate["count"], stable["count"]) < min_count:
        decision = "wait"
    else:
        decision = "promote" if candidate["lower"] > stable["upper"] - margin else "hold"
    return {"decision": decision, "candidate": candidate, "stable": stable, "min_count": min_count, "margin": margin}


def record_decision(db: LoopDb, model: str, decided: dict) -> bool:
    """Log an auto-promote decision with its numbers when it differs from the last one logged for
    this candidate (the log shows each change, not every pass); → whether it was logged."""
    candidate = decided["candidate"]["version"]
    with db.write() as conn:
        last = conn.execute("SELECT detail FROM events WHERE model = ? AND action = 'auto-promote' AND version = ? "
                            "ORDER BY id DESC LIMIT 1", (model, candidate)).fetchone()
        if last is not None and json.loads(last["detail"]).get("decision") == decided["decision"]:
            return False
        conn.execute("INSERT INTO events (model, action, version, detail, by, at) VALUES (?,?,?,?,?,?)",
                     (model, "auto-promote", candidate, json.dumps(decided), "auto-promote", time.time()))
    return True


def hold_lease(db: LoopDb, name: str, holder: str, ttl_s: float) -> bool:
    """Take or renew the lease `name` for `holder` unless another holder's is still valid: the
    one worker (of all processes on this database) that runs a once-only duty, such as auto-promote.
    A holder that stops renewing loses it after `ttl_s`."""
    now = time.time()
    with db.write() as conn:
        row = conn.execute("SELECT holder, expires FROM leases WHERE name = ?", (name,)).fetchone()
        if row is not None and row["holder"] != holder and row["expires"] > now:
            return False
        conn.execute("INSERT OR REPLACE INTO leases VALUES (?,?,?)", (name, holder, now + ttl_s))
    return True
