"""The production loop's SQLite database (`$TUNESERVE_HOME/loop.db`), shared by every serving
worker: predictions, feedback, captures, drift samples and history, rollouts and their events, and the
leases that make a once-only duty (auto-promote, drift windows) run in one worker.

WAL mode lets readers run beside the one writer; every worker batches its writes (see
service/loop/plane.py), so a busy server makes a few transactions a second, not one per request.
"""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from service.sqlite_tx import write_transaction

DB_FILE = "loop.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    request_id TEXT PRIMARY KEY, model TEXT NOT NULL, version TEXT NOT NULL, label TEXT,
    confidence REAL NOT NULL, margin REAL, entropy REAL, in_domain REAL, abstained INTEGER NOT NULL,
    created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS predictions_created ON predictions(created);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT PRIMARY KEY, model TEXT NOT NULL, version TEXT, predicted TEXT, label TEXT NOT NULL,
    created REAL NOT NULL, submitted_by TEXT, capture_id TEXT);
CREATE INDEX IF NOT EXISTS feedback_model ON feedback(model, version);
CREATE TABLE IF NOT EXISTS captures (
    capture_id TEXT PRIMARY KEY, model TEXT NOT NULL, version TEXT NOT NULL, path TEXT NOT NULL,
    bytes INTEGER NOT NULL, created REAL NOT NULL, label TEXT, confidence REAL, margin REAL, entropy REAL,
    in_domain REAL, abstained INTEGER, reason TEXT, embedding BLOB, reviewed TEXT);
CREATE INDEX IF NOT EXISTS captures_model ON captures(model, created);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, version TEXT NOT NULL, created REAL NOT NULL,
    label TEXT, in_domain REAL, abstained INTEGER NOT NULL, embedding BLOB);
CREATE INDEX IF NOT EXISTS samples_version ON samples(model, version, id);
CREATE TABLE IF NOT EXISTS drift (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, version TEXT NOT NULL, at REAL NOT NULL,
    report TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS drift_version ON drift(model, version, id);
CREATE TABLE IF NOT EXISTS shadow (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, stable TEXT NOT NULL, candidate TEXT NOT NULL,
    agree INTEGER NOT NULL, stable_ms REAL, candidate_ms REAL NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (
    model TEXT PRIMARY KEY, stable TEXT NOT NULL, candidate TEXT, mode TEXT, percent REAL NOT NULL DEFAULT 0,
    updated REAL NOT NULL, updated_by TEXT);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, action TEXT NOT NULL, version TEXT,
    detail TEXT, by TEXT, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS switches (
    model TEXT PRIMARY KEY, capture INTEGER NOT NULL, fraction REAL, updated REAL NOT NULL, updated_by TEXT);
"""


class LoopDb:
    """One connection per thread to the loop database; `write()` is one IMMEDIATE transaction."""

    def __init__(self, home: Path):
        home.mkdir(parents=True, exist_ok=True)
        self.path = home / DB_FILE
        self._local = threading.local()
        self.connection().executescript(SCHEMA)  # CREATE ... IF NOT EXISTS: safe from every worker at once

    def connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def write(self):
        """A write transaction (service/sqlite_tx.py: the lock up front, rolled back on any error)."""
        return write_transaction(self.connection(), self.path)

    def read(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        return self.connection().execute(sql, params).fetchall()
