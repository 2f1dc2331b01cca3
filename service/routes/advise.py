"""REST routes for the transfer advisor, run as durable jobs in the fine-tune job store (kind "advise").

POST /advise                 multipart: `dataset` (zip) or `data_path`, `config` JSON (candidates, folds, ...) → 202
GET  /advise?state=&limit=   advise jobs, newest first
GET  /advise/{job_id}        state, progress, and when it succeeded the full advice: ranked candidates
                             (LogME, probe accuracy, embedding time, recommended strategy) and the learning curve
POST /advise/{job_id}/cancel stop a queued or running advise job

The job child is the fine-tune entry point (`python -m training.run`), which hands `"kind": "advise"`
configs to the torch-free models/advise.py. Bad datasets, unknown or embedding-less candidates and
bad fields are refused at submit time with a 4xx naming the problem.
"""

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from models.advise import AdviseConfig, read_advice
from models.errors import ModelNotFound, TuneserveError
from service.auth import require_api_key, require_read_access
from service.finetune.runner import JobManager
from service.finetune.store import ENDED_STATES
from service.routes.finetune import SERVER_FIELDS, SubmitError, parse_submitted_config, submission_route, submit_job
from service.routes.finetune import JOB_ERRORS, JobId
from service.routes.forms import errors
from service.schemas import Job, JobList, JobState, JobSubmitted


class AdviseJob(Job):
    advice: dict[str, Any] | None = None

KIND = "advise"


def _pin(ref: str) -> str:
    """A stored candidate → its exact version tag; refused when missing or exported without an embedding."""
    from models import store as model_store

    try:
        version = model_store.resolve(ref)
    except ModelNotFound as error:
        raise SubmitError(f"candidates: {ref!r} is not a stored model: {error}", 422) from None
    if not version.manifest().embedding_output:
        raise SubmitError(f"candidates: model {version.tag} was exported without an 'embedding' output, so the advisor "
                          "cannot use it; fine-tune or re-export it with this tuneserve", 409)
    return version.tag


def validate_advise_config(raw: Any) -> dict[str, Any]:
    """The submitted `config` → a normalised advise config (candidates pinned to versions), or SubmitError."""
    from models import store as model_store

    try:
        config = AdviseConfig.from_dict({**parse_submitted_config(raw, '{"candidates": ["imagenet"]}'), "data": "<uploaded>"}).validate(check_paths=False)
    except TypeError as error:
        raise SubmitError(f"config: {error}") from None
    except TuneserveError as error:
        raise SubmitError(str(error), 422) from None
    if config.candidates:
        config.candidates = [_pin(ref) for ref in config.candidates]
    elif not any(model_store.resolve(name).manifest().embedding_output for name in model_store.list_models()):
        raise SubmitError("no stored model has an 'embedding' output to compare; fine-tune one or run "
                          "`tuneserve bootstrap` (the imagenet model has one)", 409)
    normalised = config.to_dict()
    for key in SERVER_FIELDS:
        normalised.pop(key, None)
    return normalised


def advise_config_schema() -> dict[str, Any]:
    """The JSON schema of the advise `config` field: AdviseConfig's fields and types, less the server's."""
    from pydantic import TypeAdapter

    schema = TypeAdapter(AdviseConfig).json_schema()
    for key in (*SERVER_FIELDS, "kind"):
        schema["properties"].pop(key, None)
    schema.pop("title", None)
    for field in schema["properties"].values():  # types only: ranges and defaults are AdviseConfig.validate's
        field.pop("default", None)
    return schema


def build_router(manager: JobManager, settings: Any = None) -> APIRouter:
    auth = settings if settings is not None else manager.settings
    require_write = require_api_key(auth)
    write, read = [Depends(require_write)], [Depends(require_read_access(auth))]
    route_class, submit_options, Parts = submission_route(
        manager, require_write, "The advise config (JSON): `candidates` (stored models), folds, …", advise_config_schema()
    )
    router = APIRouter(tags=["advise"], route_class=route_class)
    jobs = manager.store

    def get_job(job_id: str):
        job = jobs.get(job_id)
        if job is None or job.kind != KIND:
            raise HTTPException(404, f"no advise job {job_id!r}")
        return job

    @router.post("/advise", response_model=JobSubmitted, **submit_options)
    async def submit(request: Request, parts: Parts):
        """Rank stored models as fine-tune sources for a dataset (a durable job)."""
        return await submit_job(request, manager, KIND, validate_advise_config, parts)

    @router.get("/advise", dependencies=read, response_model=JobList, responses=errors(401, 422))
    def list_jobs(state: JobState | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100):
        """Advise jobs, newest first; `state` keeps only jobs in that state."""
        return {"jobs": [job.public() for job in jobs.list(state, limit, kind=KIND)]}

    @router.get("/advise/{job_id}", dependencies=read, response_model=AdviseJob, responses=JOB_ERRORS)
    def show(job_id: JobId):
        """State and progress; once succeeded, the full advice."""
        job = get_job(job_id)
        advice = read_advice(Path(job.job_dir) / "output") if job.state == "succeeded" else None
        return {**job.public(), "advice": advice}

    @router.post(
        "/advise/{job_id}/cancel",
        dependencies=write,
        response_model=Job,
        responses={202: {"model": Job, "description": "Stopping: the job was running"}, **JOB_ERRORS, **errors(409)},
    )
    def cancel(job_id: JobId):
        """Stop a queued or running advise job; 202 while a running job stops."""
        job = get_job(job_id)
        if job.state in ENDED_STATES:
            return JSONResponse({**job.public(), "error": f"job {job_id} is already {job.state}"}, status_code=409)
        job = jobs.request_cancel(job_id)
        return JSONResponse(job.public(), status_code=202 if job.state == "running" else 200)

    return router
