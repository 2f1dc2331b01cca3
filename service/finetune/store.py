"""Durable fine-tune jobs in SQLite under the service home.

Every worker process opens the same database (WAL mode, busy timeout). A job is claimed in one
`BEGIN IMMEDIATE` transaction that also counts the running jobs, so each job runs at most once
and at most `max_concurrent` jobs run at a time across all workers. The tables and the `Job` record
a row reads as are in service/finetune/job_record.py; this module holds the connections and queries.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from models.jobs.events import RESUMABLE_STATES, STATES
from service.finetune.job_record import Job, create_tables, row_to_job
from service.finetune.quotas import check_job_counts, retry_after
from service.sqlite_tx import write_transaction


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def process_start(pid: int | None) -> str | None:
    """The kernel's start time of a process (field 22 of /proc/PID/stat), None if unknown."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class JobStore:
    """Thread-safe (one connection per thread) and process-safe (SQLite locking) job table."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
        create_tables(self._conn())

    # -- connections -------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def _tx(self):
        """A write transaction that takes the database lock up front (no upgrade deadlocks)."""
        return write_transaction(self._conn(), self.path)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- jobs --------------------------------------------------------------------------------
    def create(
        self,
        config: dict[str, Any],
        dataset_dir: str | Path,
        job_dir: str | Path,
        job_id: str | None = None,
        submitted_by: str | None = None,
        quota: Any = None,
        kind: str = "finetune",
    ) -> Job:
        """Queue a job; with `quota` (max_jobs_per_key, max_jobs_total) the counts are checked in
        the same transaction, so concurrent submits cannot pass a limit together (QuotaExceeded)."""
        job_id = job_id or new_job_id()
        now = time.time()
        with self._tx() as conn:
            if quota is not None:
                self._check_quota(conn, submitted_by, quota)
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            conn.execute(
                "INSERT INTO jobs (id, seq, state, config, dataset_dir, job_dir, created, updated, submitted_by, kind)"
                " VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                (job_id, seq, json.dumps(config), str(dataset_dir), str(job_dir), now, now, submitted_by, kind),
            )
        return self.get(job_id)

    def active(self, submitted_by: str | None = None) -> list[Job]:
        """Queued and running jobs (of one key, if given)."""
        query = "SELECT * FROM jobs WHERE state IN ('queued', 'running')"
        values: tuple = ()
        if submitted_by is not None:
            query, values = query + " AND submitted_by IS ?", (submitted_by,)
        return [row_to_job(r) for r in self._conn().execute(query, values).fetchall()]

    def _check_quota(self, conn: sqlite3.Connection, submitted_by: str | None, quota: Any) -> None:
        count = "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')"
        total = conn.execute(count).fetchone()[0]
        per_key = conn.execute(count + " AND submitted_by IS ?", (submitted_by,)).fetchone()[0]
        if per_key >= quota.max_jobs_per_key or total >= quota.max_jobs_total:
            check_job_counts(per_key, total, submitted_by or "anonymous", quota, retry_after(self.active()))

    def ended_before(self, cutoff: float) -> list[Job]:
        """Jobs that ended (final or interrupted) before `cutoff` and still have their scratch."""
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE state NOT IN ('queued', 'running') AND finished < ? AND scratch_removed IS NULL",
            (cutoff,),
        ).fetchall()
        return [row_to_job(r) for r in rows]

    def mark_scratch_removed(self, job_id: str) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET scratch_removed = ? WHERE id = ?", (time.time(), job_id))

    def get(self, job_id: str) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row_to_job(row) if row else None

    def list(self, state: str | None = None, limit: int = 100, kind: str | None = None) -> list[Job]:
        """Newest first; `state` and `kind` filter when given."""
        where = [(column, value) for column, value in (("state", state), ("kind", kind)) if value]
        clause = (" WHERE " + " AND ".join(f"{column} = ?" for column, _ in where)) if where else ""
        rows = self._conn().execute(
            f"SELECT * FROM jobs{clause} ORDER BY seq DESC LIMIT ?", (*[value for _, value in where], limit)
        ).fetchall()
        return [row_to_job(r) for r in rows]

    def claim(self, owner: str, host: str, max_concurrent: int) -> Job | None:
        """Atomically move the oldest queued job to running for `owner`, if a slot is free."""
        now = time.time()
        with self._tx() as conn:
            running = conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running'").fetchone()[0]
            if running >= max_concurrent:
                return None
            row = conn.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            changed = conn.execute(
                "UPDATE jobs SET state = 'running', owner = ?, host = ?, started = ?, finished = NULL,"
                " pid = NULL, error = NULL, phase = 'starting', attempts = attempts + 1, updated = ?"
                " WHERE id = ? AND state = 'queued'",
                (owner, host, now, now, row["id"]),
            ).rowcount
            if changed != 1:
                return None
        return self.get(row["id"])

    def set_pid(self, job_id: str, pid: int) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET pid = ?, updated = ? WHERE id = ?", (pid, time.time(), job_id))

    def update_progress(self, job_id: str, progress: dict[str, Any] | None = None, phase: str | None = None) -> None:
        sets, values = ["updated = ?"], [time.time()]
        if progress is not None:
            sets.append("progress = ?")
            values.append(json.dumps(progress))
        if phase is not None:
            sets.append("phase = ?")
            values.append(phase)
        with self._tx() as conn:
            conn.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND state = 'running'", (*values, job_id))

    def finish(
        self,
        job_id: str,
        state: str,
        *,
        owner: str | None = None,
        model: str | None = None,
        eval: dict[str, Any] | None = None,
        error: str | None = None,
        from_states: tuple[str, ...] = ("running",),
    ) -> bool:
        """Move a job to a final (or interrupted) state; only from `from_states` (and owner, if given)."""
        assert state in STATES
        now = time.time()
        marks = ",".join("?" * len(from_states))
        query = (
            f"UPDATE jobs SET state = ?, finished = ?, model = COALESCE(?, model), eval = COALESCE(?, eval),"
            f" error = ?, updated = ? WHERE id = ? AND state IN ({marks})"
        )
        values: list[Any] = [state, now, model, json.dumps(eval) if eval is not None else None, error, now, job_id, *from_states]
        if owner is not None:
            query += " AND owner = ?"
            values.append(owner)
        with self._tx() as conn:
            return conn.execute(query, values).rowcount == 1

    def request_cancel(self, job_id: str) -> Job | None:
        """Queued → cancelled at once; running → flag for the owning worker to act on."""
        now = time.time()
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished = ?,"
                " error = 'cancelled before it started', updated = ? WHERE id = ? AND state = 'queued'",
                (now, now, job_id),
            )
            conn.execute(
                "UPDATE jobs SET cancel_requested = 1, updated = ? WHERE id = ? AND state = 'running'",
                (now, job_id),
            )
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        row = self._conn().execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def requeue_for_resume(self, job_id: str, quota: Any = None) -> bool:
        """Resumable → queued; with `quota`, counted against the submitting key like a new job."""
        now = time.time()
        marks = ",".join("?" * len(RESUMABLE_STATES))
        with self._tx() as conn:
            if quota is not None:
                row = conn.execute("SELECT submitted_by FROM jobs WHERE id = ?", (job_id,)).fetchone()
                self._check_quota(conn, row["submitted_by"] if row else None, quota)
            return (
                conn.execute(
                    "UPDATE jobs SET state = 'queued', resume = 1, cancel_requested = 0, pid = NULL, owner = NULL,"
                    f" finished = NULL, error = NULL, phase = NULL, updated = ? WHERE id = ? AND state IN ({marks})",
                    (now, job_id, *sorted(RESUMABLE_STATES)),
                ).rowcount
                == 1
            )

    def delete(self, job_id: str) -> bool:
        """Remove a job that is not queued or running; False when it is (or is gone)."""
        with self._tx() as conn:
            return (
                conn.execute(
                    "DELETE FROM jobs WHERE id = ? AND state NOT IN ('queued', 'running')", (job_id,)
                ).rowcount
                == 1
            )

    # -- workers -----------------------------------------------------------------------------
    def register_worker(self, worker_id: str, host: str, pid: int) -> None:
        now = time.time()
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO workers (id, host, pid, pid_start, started, heartbeat) VALUES (?, ?, ?, ?, ?, ?)",
                (worker_id, host, pid, process_start(pid), now, now),
            )
            # Forget workers that have been silent for a day.
            conn.execute("DELETE FROM workers WHERE heartbeat < ?", (now - 86400,))

    def heartbeat(self, worker_id: str) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE workers SET heartbeat = ? WHERE id = ?", (time.time(), worker_id))

    def unregister_worker(self, worker_id: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    def worker(self, worker_id: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT * FROM workers WHERE id = ?", (worker_id,)).fetchone()
        return dict(row) if row else None

    def orphaned_running(self, host: str, stale_after_s: float) -> list[Job]:
        """Running jobs whose owning worker is gone (same host: pid dead; other host: no heartbeat)."""
        orphans = []
        now = time.time()
        for job in self.list("running", limit=10_000):
            owner = self.worker(job.owner) if job.owner else None
            if owner is None:
                dead = True
            elif owner["host"] == host:
                # pid numbers repeat after a container restart: the start time tells them apart
                dead = not pid_alive(owner["pid"]) or process_start(owner["pid"]) != owner["pid_start"]
            else:
                dead = now - owner["heartbeat"] > stale_after_s
            if dead:
                orphans.append(job)
        return orphans


def new_job_id(prefix: str = "ft") -> str:
    return f"{prefix}-" + time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def hostname() -> str:
    return socket.gethostname()
