"""What a stored job is: the SQLite tables of the job store, the columns an older database gains
when opened, and the `Job` record a row of the `jobs` table reads as.

The store (service/finetune/store.py) holds the connections and the queries; this module holds
the shape they read and write, so the table and the record change together in one place.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from models.jobs.events import ENDED_STATES


# The tables; an older database gets the columns added since (ADDED_COLUMNS) when opened.
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    config TEXT NOT NULL,
    dataset_dir TEXT NOT NULL,
    job_dir TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    progress TEXT NOT NULL DEFAULT '{}',
    phase TEXT,
    model TEXT,
    eval TEXT,
    error TEXT,
    pid INTEGER,
    owner TEXT,
    host TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    resume INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    submitted_by TEXT,
    scratch_removed REAL,
    kind TEXT NOT NULL DEFAULT 'finetune'
);
CREATE INDEX IF NOT EXISTS jobs_state_seq ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_start TEXT,
    started REAL NOT NULL,
    heartbeat REAL NOT NULL
);
"""

_JSON_COLUMNS = ("config", "progress", "eval")
# Columns added after the first release: (name, type) added to an older database on open.
ADDED_COLUMNS = (("submitted_by", "TEXT"), ("scratch_removed", "REAL"),
                 ("kind", "TEXT NOT NULL DEFAULT 'finetune'"))  # jobs made before kinds were fine-tunes


def create_tables(conn: sqlite3.Connection) -> None:
    """Create the tables if missing and add the columns an older database lacks (CREATE TABLE IF
    NOT EXISTS leaves an existing table as it was)."""
    conn.executescript(SCHEMA)
    present = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}  # row[1]: the column name
    for name, kind in ADDED_COLUMNS:
        if name not in present:
            conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")


@dataclass
class Job:
    id: str
    state: str
    config: dict[str, Any]
    dataset_dir: str
    job_dir: str
    created: float
    started: float | None = None
    finished: float | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    phase: str | None = None
    model: str | None = None
    eval: dict[str, Any] | None = None
    error: str | None = None
    pid: int | None = None
    owner: str | None = None
    host: str | None = None
    attempts: int = 0
    cancel_requested: bool = False
    resume: bool = False
    seq: int = 0
    updated: float = 0.0
    submitted_by: str | None = None  # the API key name (service/auth.py)
    scratch_removed: float | None = None  # when retention removed the dataset copy and checkpoints
    kind: str = "finetune"  # a job kind (service/jobs/kinds.py); one store and state machine for every long task

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    def public(self) -> dict[str, Any]:
        """What the HTTP API answers: no host paths beyond the job's own, ISO-ish timestamps kept as epoch seconds."""
        return {
            "job_id": self.id,
            "kind": self.kind,
            "state": self.state,
            "name": self.config.get("name"),
            "source": self.config.get("source"),
            "config": self.config,
            "phase": self.phase,
            "progress": self.progress,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "model": self.model,
            "eval": self.eval,
            "error": self.error,
            "attempts": self.attempts,
            "cancel_requested": self.cancel_requested,
            "submitted_by": self.submitted_by,
            "scratch_removed": self.scratch_removed,
        }


def row_to_job(row: sqlite3.Row) -> Job:
    """A `jobs` row as a Job: JSON columns parsed, SQLite's 0/1 flags as booleans."""
    data = dict(row)
    for column in _JSON_COLUMNS:
        if data.get(column) is not None:
            data[column] = json.loads(data[column])
    data["cancel_requested"] = bool(data["cancel_requested"])
    data["resume"] = bool(data["resume"])
    if data.get("progress") is None:
        data["progress"] = {}
    return Job(**data)
