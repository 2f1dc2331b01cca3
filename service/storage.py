"""What must outlive a container (the writable model store, the jobs database and job folders),
checked at start: in a container each should sit on a mounted volume, else `docker rm` loses it.

Also shares the bento's baked model store with the fine-tune child processes (models/artifact/store.py).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from models.artifact import store

log = logging.getLogger("tuneserve.service")
MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mount_points(mountinfo: str) -> list[Path]:
    """Mount points listed in /proc/self/mountinfo text (the fifth field of each line)."""
    points = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.append(Path(_unescape(fields[4])))
    return points


def mount_point_of(path: Path, points: list[Path]) -> Path:
    """The mount that holds `path`: the longest mount point it lies under (need not exist yet)."""
    path = Path(os.path.abspath(path))
    holders = [p for p in points if path == p or path.is_relative_to(p)]
    return max(holders, key=lambda p: len(p.parts), default=Path("/"))


def state_paths(home: Path) -> dict[str, Path]:
    """What a container must keep, by what it is."""
    return {
        "model store (new model versions)": store.writable_root(),
        "fine-tune jobs (database and job folders)": Path(home) / "finetune",
    }


def ephemeral_state(home: Path, environ: Mapping[str, str], mountinfo: str) -> list[str]:
    """Warnings for each state path a container keeps on its own filesystem; none outside one."""
    if environ.get("BENTOML_CONTAINERIZED", "").strip().lower() not in ("1", "true", "yes"):
        return []
    points = mount_points(mountinfo)
    warnings = []
    for what, path in state_paths(home).items():
        if mount_point_of(path, points) == Path("/"):
            warnings.append(
                f"{what} at {path} is on the container's own filesystem, not a mounted volume: it is lost "
                f"with `docker rm`; mount a volume at {path} (docs/deploy.md: model stores and container volumes)"
            )
    return warnings


def prepare_state(home: Path) -> list[str]:
    """At start: export the baked store for job children, and warn about state a container loses."""
    store.export_for_children()
    try:
        mountinfo = MOUNTINFO.read_text()
    except OSError:
        mountinfo = ""
    warnings = ephemeral_state(home, os.environ, mountinfo)
    for warning in warnings:
        log.warning(warning)
    return warnings
