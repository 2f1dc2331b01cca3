"""The capture store: images of served requests, kept for review and fine-tuning, opt-in per model.

Files live under `$TUNESERVE_HOME/capture/<model>/<capture_id>` (the upload's bytes as sent), rows
in the loop database. Limits (size, count, age) are enforced on every write, oldest out first,
and a write is skipped when the disk would keep less than `min_free_bytes` free: capture never
fills the disk. Sampling (`should_capture`): every abstained or out-of-domain request, plus a
random `fraction` of the rest.
"""
from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.artifact import store
from models.serving.ood import IN_DOMAIN_THRESHOLD
from service.loop.db import LoopDb
from service.names import REQUEST_ID, checked, path_under

CAPTURE_DIR = "capture"


@dataclass(frozen=True)
class CaptureLimits:
    max_bytes: int
    max_items: int
    max_age_seconds: float
    min_free_bytes: int


@dataclass(frozen=True)
class Captured:
    """One request to keep: its bytes and what was answered."""

    capture_id: str
    model: str
    version: str
    data: bytes
    label: str | None
    confidence: float
    margin: float | None
    entropy: float | None
    in_domain: float | None
    abstained: bool
    reason: str
    embedding: np.ndarray | None = None


def capture_reason(abstained: bool, in_domain: float | None, fraction: float, rng: random.Random) -> str | None:
    """Why this request is kept (`abstained`, `out_of_domain`, `sampled`), or None to skip it."""
    if abstained:
        return "abstained"
    if in_domain is not None and in_domain < IN_DOMAIN_THRESHOLD:
        return "out_of_domain"
    return "sampled" if rng.random() < fraction else None


class CaptureStore:
    """Bounded files + rows; see the module docstring."""

    def __init__(self, db: LoopDb, home: Path, limits: CaptureLimits):
        self.db = db
        self.root = home / CAPTURE_DIR
        self.limits = limits

    def _path(self, model: str, capture_id: str) -> Path:
        """`root/<model>/<capture_id>`, from checked parts only (service/names.py): a capture id is made
        by the server, never taken from a caller, and the path cannot leave the capture root."""
        checked(model, store.NAME_PATTERN, "model name", "a stored model's name")
        checked(capture_id, REQUEST_ID, "capture id", "a request id made by the server")
        return path_under(self.root, model, capture_id)

    def write(self, items: list[Captured]) -> int:
        """Store what fits within the limits; → how many. Pruning and inserting are one IMMEDIATE
        transaction, so two workers writing at once cannot both make room for themselves and overshoot."""
        items = self._newest_that_fit(items)
        size = sum(len(item.data) for item in items)
        if not items or not self._room_on_disk(size):
            return 0
        rows, written = [], []
        try:
            removed = self._write_rows(items, size, rows, written)
        except BaseException:
            self._unlink([{"path": path} for path in written])   # rolled back: no file without its row
            raise
        self._unlink(removed)
        return len(rows)

    def _write_rows(self, items: list[Captured], size: int, rows: list, written: list) -> list:
        with self.db.write() as conn:
            removed = self._prune_in(conn, extra_bytes=size, extra_items=len(items))
            for item in items:
                path = self._path(item.model, item.capture_id)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(item.data)
                written.append(path)
                embedding = None if item.embedding is None else np.asarray(item.embedding, np.float16).tobytes()
                rows.append((item.capture_id, item.model, item.version, str(path), len(item.data), time.time(),
                             item.label, item.confidence, item.margin, item.entropy, item.in_domain,
                             int(item.abstained), item.reason, embedding))
            conn.executemany("INSERT OR REPLACE INTO captures VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,NULL)", rows)
        return removed

    def _newest_that_fit(self, items: list[Captured]) -> list[Captured]:
        """The newest items of a batch that fit the limits on their own (older ones would be pruned at once)."""
        kept, size = [], 0
        for item in reversed(items):
            if len(kept) < self.limits.max_items and size + len(item.data) <= self.limits.max_bytes:
                kept.append(item)
                size += len(item.data)
        return kept[::-1]

    def _room_on_disk(self, size: int) -> bool:
        self.root.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.root).free - size >= self.limits.min_free_bytes

    def prune(self, extra_bytes: int = 0, extra_items: int = 0) -> int:
        """Remove the oldest captures until age, count and size (with room for `extra_*`) fit."""
        with self.db.write() as conn:
            removed = self._prune_in(conn, extra_bytes, extra_items)
        self._unlink(removed)
        return len(removed)

    def _prune_in(self, conn, extra_bytes: int, extra_items: int) -> list:
        """Delete the rows to prune inside the caller's transaction; → those rows (files still to unlink)."""
        too_old = time.time() - self.limits.max_age_seconds
        removed = conn.execute("SELECT capture_id, model, path FROM captures WHERE created < ?", (too_old,)).fetchall()
        count, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM captures WHERE created >= ?",
                                   (too_old,)).fetchone()
        count += extra_items
        size += extra_bytes
        if count > self.limits.max_items or size > self.limits.max_bytes:
            for row in conn.execute("SELECT capture_id, model, path, bytes FROM captures WHERE created >= ? "
                                    "ORDER BY created", (too_old,)):
                if count <= self.limits.max_items and size <= self.limits.max_bytes:
                    break
                removed.append(row)
                count, size = count - 1, size - row["bytes"]
        conn.executemany("DELETE FROM captures WHERE capture_id = ?", [(r["capture_id"],) for r in removed])
        return removed

    @staticmethod
    def _unlink(rows: list) -> None:
        for row in rows:
            Path(row["path"]).unlink(missing_ok=True)

    def counts(self, model: str | None = None) -> dict:
        """Captured images and bytes (all models, or one), by reason, and the limits."""
        where, params = ("WHERE model = ?", (model,)) if model else ("", ())
        total = self.db.read(f"SELECT COUNT(*) AS n, COALESCE(SUM(bytes), 0) AS bytes, "
                             f"COALESCE(SUM(reviewed IS NOT NULL), 0) AS reviewed FROM captures {where}", params)[0]
        reasons = self.db.read(f"SELECT reason, COUNT(*) AS n FROM captures {where} GROUP BY reason", params)
        return {"images": total["n"], "bytes": total["bytes"], "reviewed": total["reviewed"],
                "by_reason": {r["reason"]: r["n"] for r in reasons},
                "limits": {"max_bytes": self.limits.max_bytes, "max_items": self.limits.max_items,
                           "max_age_seconds": self.limits.max_age_seconds}}

    def image(self, model: str, capture_id: str) -> bytes | None:
        rows = self.db.read("SELECT path FROM captures WHERE model = ? AND capture_id = ?", (model, capture_id))
        if not rows:
            return None
        try:
            return Path(rows[0]["path"]).read_bytes()
        except OSError:
            return None
