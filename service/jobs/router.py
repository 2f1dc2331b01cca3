"""One REST router per job kind (kinds.py), the same operations for each:

POST   /{kind}                  multipart: `dataset` (zip) or `data_path`, and `config` (JSON) → 202
GET    /{kind}?state=&limit=    jobs of that kind, newest first
GET    /{kind}/{job_id}         state, phase, progress, timestamps, and the result (model + eval, advice, …) or the error
GET    /{kind}/{job_id}/log     the tail of the job's log (text)
POST   /{kind}/{job_id}/cancel  stop a queued or running job (nothing is published)
POST   /{kind}/{job_id}/resume  requeue an interrupted/failed/cancelled job (a fine-tune continues from its last epoch)
DELETE /{kind}/{job_id}         forget an ended job and free its disk

Every check that can fail runs at submit time and answers a 4xx naming the problem.
"""

import shutil
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path as PathParam, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from models.jobs.events import ENDED_STATES, RESUMABLE_STATES
from service.auth import require_api_key, require_read_access
from service.finetune import quotas
from service.finetune.job_record import Job as StoredJob
from service.finetune.logs import tail_lines
from service.finetune.runner import JobManager
from service.finetune.store import JobStore
from service.jobs.kinds import JobKind
from service.jobs.submit import submission_route, submit_job
from service.routes.forms import error_response, errors
from service.schemas import Job, JobDeleted, JobList, JobState, JobSubmitted

JOB_ID = r"^[a-z]{2,3}-[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$"  # service/finetune/store.py new_job_id()
JobId = Annotated[str, PathParam(pattern=JOB_ID, description="A job id, as the submission answered it")]
JOB_ERRORS = errors(401, 404, 422)
LOG_RESPONSE = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "The log's last lines"}}


def build_router(kind: JobKind, manager: JobManager, settings: Any = None) -> APIRouter:  # no __future__ annotations: FastAPI reads `Parts`
    """The routes of one job kind; `settings`: the service Settings."""
    auth = settings if settings is not None else manager.settings
    require_write = require_api_key(auth)
    write, read = [Depends(require_write)], [Depends(require_read_access(auth))]
    route_class, submit_options, Parts = submission_route(manager, kind, require_write)
    router = APIRouter(tags=[kind.name], route_class=route_class)
    jobs, prefix = manager.store, f"/{kind.name}"

    def get_job(job_id: str) -> StoredJob:
        job = jobs.get(job_id)
        if job is None or job.kind != kind.name:
            raise HTTPException(404, f"no {kind.title} job {job_id!r}")
        return job

    async def submit(request: Request, parts: Parts):
        return await submit_job(request, manager, kind, parts)

    def list_jobs(state: JobState | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100):
        return {"jobs": [job.public() for job in jobs.list(state, limit, kind=kind.name)]}

    def show(job_id: JobId):
        job = get_job(job_id)
        return {**job.public(), **kind.result(job)}

    def show_log(job_id: JobId, lines: Annotated[int, Query(ge=1, le=5000)] = 50):
        return tail_lines(Path(get_job(job_id).job_dir) / "train.log", lines)

    def cancel(job_id: JobId):
        return cancel_job(jobs, get_job(job_id))

    def resume(job_id: JobId):
        return resume_job(manager, get_job(job_id))

    def delete(job_id: JobId):
        return delete_job(jobs, manager.settings.jobs_dir, get_job(job_id))

    stopping = {202: {"model": Job, "description": "Stopping: the job was running"}}
    one = f"{prefix}/{{job_id}}"
    router.add_api_route(prefix, submit, methods=["POST"], response_model=JobSubmitted, summary=f"Submit a {kind.title} job",
                         description=kind.summary, operation_id=f"submit_{kind.name}", **submit_options)
    router.add_api_route(prefix, list_jobs, methods=["GET"], dependencies=read, response_model=JobList,
                         responses=errors(401, 422), operation_id=f"list_{kind.name}",
                         description=f"{kind.title.capitalize()} jobs, newest first; `state` keeps only jobs in that state.")
    router.add_api_route(one, show, methods=["GET"], dependencies=read, response_model=kind.result_model,
                         responses=JOB_ERRORS, operation_id=f"get_{kind.name}",
                         description="One job: state, phase, progress, timestamps, and its result once it succeeded, or the error.")
    # A log holds tracebacks and server paths: it needs a key, like the writing routes (docs/security.md).
    router.add_api_route(f"{one}/log", show_log, methods=["GET"], dependencies=write, response_class=PlainTextResponse,
                         responses={**LOG_RESPONSE, **JOB_ERRORS}, operation_id=f"log_{kind.name}",
                         description="The last `lines` lines of the job's log.")
    router.add_api_route(f"{one}/cancel", cancel, methods=["POST"], dependencies=write, response_model=Job,
                         responses={**stopping, **JOB_ERRORS, **errors(409)}, operation_id=f"cancel_{kind.name}",
                         description="Stop a queued or running job (nothing is published); 202 while a running job stops.")
    router.add_api_route(f"{one}/resume", resume, methods=["POST"], status_code=202, dependencies=write, response_model=Job,
                         responses={**JOB_ERRORS, **errors(409, 429)}, operation_id=f"resume_{kind.name}",
                         description="Requeue an interrupted, failed or cancelled job; a fine-tune continues from its last epoch checkpoint.")
    router.add_api_route(one, delete, methods=["DELETE"], dependencies=write, response_model=JobDeleted,
                         responses={**JOB_ERRORS, **errors(409)}, operation_id=f"delete_{kind.name}",
                         description="Forget an ended job and free its disk (dataset copy, checkpoints, logs). "
                                     "Published model versions are not touched.")
    return router


def cancel_job(jobs: JobStore, job: StoredJob) -> JSONResponse:
    if job.state in ENDED_STATES:
        # the message last: the job's own `error` field (often null) must not replace it
        return JSONResponse({**job.public(), "error": f"job {job.id} is already {job.state}"}, status_code=409)
    job = jobs.request_cancel(job.id)
    return JSONResponse(job.public(), status_code=202 if job.state == "running" else 200)


def resume_job(manager: JobManager, job: StoredJob) -> JSONResponse | dict[str, Any]:
    if job.state not in RESUMABLE_STATES:
        return JSONResponse(
            {"error": f"job {job.id} is {job.state}; only {sorted(RESUMABLE_STATES)} jobs can be resumed"}, status_code=409
        )
    if not Path(job.dataset_dir).exists():
        return JSONResponse({"error": f"job {job.id}: its dataset is gone ({job.dataset_dir})"}, status_code=409)
    try:
        requeued = manager.store.requeue_for_resume(job.id, quota=manager.settings)
    except quotas.QuotaExceeded as error:
        return error_response(error)
    if not requeued:
        return JSONResponse({"error": f"job {job.id} changed state; try again"}, status_code=409)
    manager.wake()
    return manager.store.get(job.id).public()


def delete_job(jobs: JobStore, jobs_dir: Path, job: StoredJob) -> JSONResponse | dict[str, Any]:
    if not jobs.delete(job.id):
        return JSONResponse({"error": f"job {job.id} is {job.state}; cancel it first"}, status_code=409)
    job_dir = Path(job.job_dir).resolve()
    if job_dir.is_relative_to(jobs_dir.resolve()):
        shutil.rmtree(job_dir, ignore_errors=True)
    return {"job_id": job.id, "deleted": True, "state": job.state}


def unavailable_router(reason: str, prefixes: tuple[str, ...]) -> APIRouter:
    """Every job route answers 501 with `reason` (a serve-only server, or jobs turned off), instead
    of a 404 that would hide why."""
    router = APIRouter()

    async def unavailable() -> JSONResponse:
        return JSONResponse({"error": reason}, status_code=501)

    for prefix in prefixes:
        router.add_api_route(prefix, unavailable, methods=["GET", "POST"], include_in_schema=False)
        router.add_api_route(prefix + "/{rest:path}", unavailable, methods=["GET", "POST", "DELETE"], include_in_schema=False)
    return router
