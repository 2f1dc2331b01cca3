"""One write transaction for the service's SQLite databases (the job store and the loop's database)."""
from __future__ import annotations

import logging
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from models.errors import StorageFull, is_disk_full

log = logging.getLogger("tuneserve.service")


@contextmanager
def write_transaction(conn: sqlite3.Connection, path: str | Path) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (the lock up front: no upgrade deadlocks between workers), COMMIT, or ROLLBACK.

    On a full disk the COMMIT itself fails: the transaction is rolled back (else the connection
    stays stuck in it) and StorageFull (507) names the database; nothing was changed."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException as error:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if is_disk_full(error):
            log.error("the database %s cannot be written: %s", path, error)  # the path stays in the server log
            raise StorageFull(f"the database {Path(path).name} cannot be written: the disk is full; nothing was changed") from error
        raise
