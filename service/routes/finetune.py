"""REST routes for fine-tune jobs: the one job router (service/jobs/router.py, which lists the
operations) for the fine-tune kind (service/jobs/finetune.py: the config and its checks)."""
from typing import Any

from fastapi import APIRouter

from service.finetune.runner import JobManager
from service.jobs import finetune
from service.jobs.router import JOB_ID, build_router as job_router

__all__ = ["JOB_ID", "build_router"]


def build_router(manager: JobManager, settings: Any = None) -> APIRouter:
    return job_router(finetune.KIND, manager, settings)
