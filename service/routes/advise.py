"""REST routes for the transfer advisor: the one job router (service/jobs/router.py) for the advise
kind (service/jobs/advise.py). Once a job succeeded, GET /advise/{job_id} holds the full advice:
ranked candidates (LogME, probe accuracy, embedding time, recommended strategy) and the learning curve."""
from typing import Any

from fastapi import APIRouter

from service.finetune.runner import JobManager
from service.jobs import advise
from service.jobs.router import build_router as job_router


def build_router(manager: JobManager, settings: Any = None) -> APIRouter:
    return job_router(advise.KIND, manager, settings)
