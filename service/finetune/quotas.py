"""Quotas for fine-tune jobs: queued + running jobs per key and in total (429), a disk budget for
uploads and job folders (507), and retention of finished jobs' scratch. Published model versions
live in the model store, outside these folders, and are never removed here.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

from models.errors import TuneserveError

log = logging.getLogger("tuneserve.finetune")
DEFAULT_RETRY_AFTER_S = 60


class QuotaExceeded(TuneserveError):
    """Too many queued + running jobs (429); `retry_after` seconds, `limit` names the setting."""

    status = 429

    def __init__(self, message: str, limit: str, retry_after: int = DEFAULT_RETRY_AFTER_S):
        super().__init__(message)
        self.limit = limit
        self.retry_after = max(1, int(retry_after))

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after), "X-Tuneserve-Limit": self.limit}


class InsufficientStorage(TuneserveError):
    """The disk budget or the disk itself has no room (507)."""

    status = 507


def check_job_counts(per_key: int, total: int, key_name: str, settings: Any, retry_after: int) -> None:
    """QuotaExceeded when another queued job would pass either limit (`per_key`/`total`: jobs now)."""
    if per_key >= settings.max_jobs_per_key:
        raise QuotaExceeded(
            f"key {key_name!r} already has {per_key} queued or running jobs; the limit is "
            f"{settings.max_jobs_per_key} per key (TUNESERVE_MAX_JOBS_PER_KEY). Retry when one finishes.",
            "TUNESERVE_MAX_JOBS_PER_KEY", retry_after,
        )
    if total >= settings.max_jobs_total:
        raise QuotaExceeded(
            f"the server already has {total} queued or running jobs; the limit is {settings.max_jobs_total} "
            "in total (TUNESERVE_MAX_JOBS_TOTAL). Retry when one finishes.",
            "TUNESERVE_MAX_JOBS_TOTAL", retry_after,
        )


def retry_after(active_jobs: Iterable[Any]) -> int:
    """Seconds until the first active job is expected to end (its reported ETA), else a minute."""
    etas = [job.progress.get("eta_s") for job in active_jobs if job.state == "running"]
    etas = [eta for eta in etas if isinstance(eta, (int, float)) and eta >= 0]
    return int(min(etas)) + 1 if etas else DEFAULT_RETRY_AFTER_S


def folder_bytes(folder: Path) -> int:
    """Bytes the files under `folder` take (allocated blocks, as the disk sees them)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:  # removed while we walk
                pass
    return total


def used_bytes(settings: Any) -> int:
    return folder_bytes(settings.uploads_dir) + folder_bytes(settings.jobs_dir)


def check_disk(settings: Any, incoming: int) -> int:
    """InsufficientStorage unless `incoming` more bytes fit the budget and the disk itself; → bytes left."""
    used = used_bytes(settings)
    budget = settings.finetune_disk_budget_bytes
    if used + incoming > budget:
        raise InsufficientStorage(
            f"fine-tune disk budget exceeded: uploads and job folders use {used} bytes, this submission needs "
            f"{incoming} more, the budget is {budget} (TUNESERVE_FINETUNE_DISK_BUDGET_MB). Delete finished jobs "
            "(DELETE /finetune/{job_id}) or raise the budget."
        )
    settings.jobs_root.mkdir(parents=True, exist_ok=True)
    free = free_bytes(settings.jobs_root)
    if incoming + settings.finetune_min_free_bytes > free:
        raise InsufficientStorage(
            f"the job disk has {free} bytes free; this submission needs {incoming} plus "
            f"{settings.finetune_min_free_bytes} kept free (TUNESERVE_FINETUNE_MIN_FREE_MB). Free some space and submit again."
        )
    return min(budget - used, free - settings.finetune_min_free_bytes)


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def disk_too_full(settings: Any, job_dir: Path) -> bool:
    """A running job stops below the free-space floor: job scratch must never fill the disk the
    service (its job database, and BentoML's metrics files when they share it) needs."""
    if settings.finetune_min_free_bytes <= 0:
        return False
    try:
        return free_bytes(job_dir) < settings.finetune_min_free_bytes
    except OSError:  # the folder is gone: the job will say so itself
        return False


def remove_scratch(job: Any) -> None:
    """Drop a job's uploaded dataset copy and the trainer's checkpoints; keep its config, logs,
    progress and metrics (the published version has its own checkpoint)."""
    job_dir = Path(job.job_dir)
    if Path(job.dataset_dir).resolve().is_relative_to((job_dir / "dataset").resolve()):
        shutil.rmtree(job_dir / "dataset", ignore_errors=True)
    output = job_dir / "output"
    for item in list(output.glob("*.pt")) + [output / "export", output / "staging"]:
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)


def expire_scratch(store: Any, settings: Any, now: float | None = None) -> list[str]:
    """Remove the scratch of jobs that ended more than `retention_seconds` ago (once each)."""
    cutoff = (now if now is not None else time.time()) - settings.retention_seconds
    expired = []
    for job in store.ended_before(cutoff):
        if Path(job.job_dir).resolve().is_relative_to(settings.jobs_dir.resolve()):
            remove_scratch(job)
        store.mark_scratch_removed(job.id)
        expired.append(job.id)
    if expired:
        log.info("retention: removed the dataset copy and checkpoints of %d job(s): %s", len(expired), expired)
    return expired
