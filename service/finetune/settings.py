"""The fine-tune knobs: the view of the service `Settings` that jobs need."""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.datasets import ZipLimits
from models.preprocess import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS

ZIP_LIMITS = ZipLimits()  # archive limits: the defaults live in models/datasets.py


@dataclass(frozen=True)
class FinetuneSettings:
    home: Path
    data_root: Path | None
    api_key: str | None
    protect_reads: bool = False  # reading routes need the key too (service/auth.py)
    auth: bool = True  # False: every route open (TUNESERVE_AUTH=off)
    api_keys: tuple[tuple[str, str], ...] = ()  # named keys from the environment
    api_keys_file: Path | None = None  # default home/api-keys
    max_concurrent_jobs: int = 1
    grace_seconds: float = 10.0
    poll_seconds: float = 1.0
    training_command: tuple[str, ...] = ()
    max_upload_bytes: int = ZIP_LIMITS.max_archive_bytes
    max_entries: int = ZIP_LIMITS.max_entries
    max_unpacked_bytes: int = ZIP_LIMITS.max_unpacked_bytes
    min_per_class: int = 5
    max_pixels: int = DEFAULT_MAX_PIXELS
    allowed_formats: frozenset[str] = ALLOWED_FORMATS
    stale_worker_seconds: float = 30.0
    job_backend: str = "local"  # local | ray | none (backends.py)
    ray_address: str | None = None  # Ray dashboard URL for job submission, or "auto"
    ray_num_cpus: float = 1.0  # resources a Ray job asks for
    ray_num_gpus: float = 0.0  # with device=cuda at least 1
    max_jobs_per_key: int = 4  # queued + running jobs per key (429 beyond)
    max_jobs_total: int = 16  # queued + running jobs in all (429 beyond)
    disk_budget_bytes: int = 20 * 1024**3  # uploads + job folders (507 beyond)
    retention_seconds: float = 7 * 86400.0  # finished jobs' dataset copy and checkpoints go after this
    min_free_bytes: int = 64 * 1024**2  # kept free on the job disk: submissions 507, running jobs stopped below it

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
    def from_settings(cls, settings: Settings | FinetuneSettings) -> "FinetuneSettings":
        """The fields jobs need, from the service `Settings` (service/config.py reads the environment)."""
        if isinstance(settings, FinetuneSettings):
            return settings
        command = settings.training_command
        command = tuple(shlex.split(command)) if command else (str(settings.training_python), "-m", "training.run")
        return cls(
            home=Path(settings.home),
            data_root=Path(settings.data_root).expanduser().resolve() if settings.data_root else None,
            api_key=settings.api_key or None,
            protect_reads=settings.protect_reads,
            auth=settings.auth,
            api_keys=settings.api_keys,
            api_keys_file=settings.api_keys_file,
            max_concurrent_jobs=settings.max_concurrent_jobs,
            grace_seconds=settings.job_grace_seconds,
            poll_seconds=settings.poll_seconds,
            training_command=command,
            max_upload_bytes=settings.finetune_max_upload_bytes,
            max_entries=settings.max_zip_entries,
            max_unpacked_bytes=settings.max_unpacked_bytes,
            min_per_class=settings.finetune_min_per_class,
            max_pixels=settings.max_pixels,
            allowed_formats=settings.allowed_formats,
            job_backend=settings.job_backend,
            ray_address=settings.ray_address,
            ray_num_cpus=settings.ray_num_cpus,
            ray_num_gpus=settings.ray_num_gpus,
            max_jobs_per_key=settings.max_jobs_per_key,
            max_jobs_total=settings.max_jobs_total,
            disk_budget_bytes=settings.finetune_disk_budget_bytes,
            retention_seconds=settings.finetune_retention_hours * 3600.0,
            min_free_bytes=settings.finetune_min_free_bytes,
        )
