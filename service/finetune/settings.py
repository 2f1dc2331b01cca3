"""The fine-tune knobs, read from the service `Settings` when it has them, else the environment."""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _pick(settings: Any, attr: str, env: str, default: Any, cast=str) -> Any:
    value = getattr(settings, attr, None) if settings is not None else None
    if value is None or value == "":
        raw = os.environ.get(env)
        if raw is None or raw == "":
            return default
        return cast(raw)
    return cast(value) if not isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class FinetuneSettings:
    home: Path
    data_root: Path | None
    api_key: str | None
    max_concurrent_jobs: int = 1
    grace_seconds: float = 10.0
    poll_seconds: float = 1.0
    training_command: tuple[str, ...] = ()
    max_upload_bytes: int = 500 * 1024**2
    max_entries: int = 50_000
    max_unpacked_bytes: int = 2 * 1024**3
    min_per_class: int = 5
    max_pixels: int = 40_000_000
    stale_worker_seconds: float = 30.0

    @property
    def root(self) -> Path:
        return self.home / "finetune"

    @property
    def db_path(self) -> Path:
        return self.root / "jobs.sqlite3"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    @property
    def uploads_dir(self) -> Path:
        return self.root / "uploads"

    @classmethod
    def from_settings(cls, settings: Any = None) -> "FinetuneSettings":
        if isinstance(settings, FinetuneSettings):
            return settings
        home = Path(_pick(settings, "home", "TUNESERVE_HOME", str(Path.home() / ".tuneserve"))).expanduser()
        data_root = _pick(settings, "data_root", "TUNESERVE_DATA_ROOT", None)
        python = _pick(settings, "training_python", "TUNESERVE_TRAINING_PYTHON", sys.executable)
        command = _pick(settings, "training_command", "TUNESERVE_TRAINING_COMMAND", None)
        if command is None:
            command = (str(python), "-m", "training.run")
        elif isinstance(command, str):
            command = tuple(shlex.split(command))
        return cls(
            home=home,
            data_root=Path(data_root).expanduser().resolve() if data_root else None,
            api_key=_pick(settings, "api_key", "TUNESERVE_API_KEY", None) or None,
            max_concurrent_jobs=max(1, int(_pick(settings, "max_concurrent_jobs", "TUNESERVE_MAX_CONCURRENT_JOBS", 1, int))),
            grace_seconds=float(_pick(settings, "job_grace_seconds", "TUNESERVE_JOB_GRACE_SECONDS", 10.0, float)),
            poll_seconds=float(_pick(settings, "poll_seconds", "TUNESERVE_POLL_SECONDS", 1.0, float)),
            training_command=tuple(command),
            max_upload_bytes=int(float(_pick(settings, "finetune_max_upload_mb", "TUNESERVE_FINETUNE_MAX_UPLOAD_MB", 500, float)) * 1024**2),
            max_entries=int(_pick(settings, "max_zip_entries", "TUNESERVE_MAX_ZIP_ENTRIES", 50_000, int)),
            max_unpacked_bytes=int(float(_pick(settings, "max_unpacked_mb", "TUNESERVE_MAX_UNPACKED_MB", 2048, float)) * 1024**2),
            min_per_class=int(_pick(settings, "finetune_min_per_class", "TUNESERVE_FINETUNE_MIN_PER_CLASS", 5, int)),
            max_pixels=int(_pick(settings, "max_pixels", "TUNESERVE_MAX_PIXELS", 40_000_000, int)),
        )
