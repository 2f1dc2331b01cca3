"""Reading a job's files while it runs: the tail of its log, and the progress events appended
since the last look (models/jobs/events.py names them)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from models.jobs.events import parse_line


def tail_lines(path: Path, lines: int = 8) -> str:
    """The last `lines` lines, reading backwards in blocks (a log can be large); "" when unreadable."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            position = handle.tell()
            data = b""
            while position > 0 and data.count(b"\n") <= lines:
                step = min(64 * 1024, position)
                position -= step
                handle.seek(position)
                data = handle.read(step) + data
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").strip().splitlines()[-lines:])


class ProgressReader:
    """Reads complete event lines appended since the last call (a partial last line waits)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.buffer = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [event for event in map(parse_line, lines) if event is not None]
