"""REST routes for fine-tune jobs (FastAPI); service/app.py includes them when jobs are available.

POST /finetune                 multipart: `dataset` (zip) or `data_path` (inside the data root), `config` JSON → 202
GET  /finetune?state=&limit=   jobs, newest first
GET  /finetune/{job_id}        one job: state, phase, progress, timestamps, model + eval or error
GET  /finetune/{job_id}/log    the tail of the job's training log (text)
POST /finetune/{job_id}/cancel stop a queued or running job (no model is published)
POST /finetune/{job_id}/resume requeue an interrupted/failed/cancelled job; continues from its last epoch checkpoint

Every check that can fail runs at submit time and answers a 4xx naming the problem.
"""

import json
import re
import shutil
from pathlib import Path
from typing import Annotated, Any, Callable, get_type_hints

from fastapi import APIRouter, Depends, File, Form, HTTPException, Path as PathParam, Query, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from models.errors import DatasetError, ModelNotFound, TuneserveError, is_disk_full
from models.train_config import TrainConfig
from pydantic import TypeAdapter, ValidationError
from service.auth import require_api_key, require_read_access
from service.finetune import quotas
from service.finetune.runner import JobManager, _tail
from service.finetune.settings import FinetuneSettings
from service.finetune.store import ENDED_STATES, RESUMABLE_STATES, JobStore, new_job_id
from service.finetune.store import Job as StoredJob
from service.limits import inside_root
from service.routes.forms import _NAME, NO_NUL, call_auth, error_response, errors, exactly_one_of, form_route, json_form_part
from service.schemas import Job, JobDeleted, JobList, JobState, JobSubmitted

# Fields the server fills in itself; a client must not point training at arbitrary paths.
SERVER_FIELDS = ("data", "output_dir")
WEIGHT_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
MAX_BAD_PATHS = 20
JOB_ID = r"^[a-z]{2,3}-[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$"  # service/finetune/store.py new_job_id()
JobId = Annotated[str, PathParam(pattern=JOB_ID, description="A job id, as the submission answered it")]
JOB_ERRORS = errors(401, 404, 422)
MODEL_NAME = f"^{_NAME}$"
_CONFIG_TYPES = TypeAdapter(TrainConfig)
_FIELD_TYPES = {name: TypeAdapter(hint) for name, hint in get_type_hints(TrainConfig).items()}


class SubmitError(TuneserveError):
    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


# -- config validation ------------------------------------------------------------------------
def parse_submitted_config(raw: Any, example: str) -> dict[str, Any]:
    """A job's submitted `config` (JSON text or an object) → a dict without server-set fields, or SubmitError."""
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw or "{}")
        except json.JSONDecodeError as error:
            raise SubmitError(f"config: not valid JSON ({error.msg} at position {error.pos})") from None
    if not isinstance(raw, dict):
        raise SubmitError(f"config: must be a JSON object such as {example}")
    given = [key for key in SERVER_FIELDS if key in raw]
    if given:
        raise SubmitError(f"config: {given} are set by the server (send the data as `dataset` or `data_path`)")
    return raw


def validate_config(raw: Any) -> dict[str, Any]:
    """The submitted `config` → a normalised dict of training config fields, or SubmitError(422/404)."""
    from models import store as model_store

    raw = parse_submitted_config(raw, '{"name": "digits", "source": "efficientnet_lite0"}')
    if not raw.get("name"):
        raise SubmitError("config: `name` (the target model name) is required")
    _check_types(raw)
    try:
        config = TrainConfig.from_dict({**raw, "data": "<uploaded>"})
        config.validate(check_paths=False)
    except TypeError as error:
        raise SubmitError(f"config: {error}") from None
    except TuneserveError as error:
        raise SubmitError(str(error), 422) from None
    normalised = config.to_dict()
    is_registry = config.is_registry_source()
    weight_refs = [config.weights, config.source_parts()[1] if is_registry else None]
    for ref in filter(None, weight_refs):
        if not WEIGHT_NAME.match(ref):
            # a local weights file is a CLI feature; over HTTP it would let a client open any server file
            raise SubmitError(
                f"weights: {ref!r} is not a weights name; over HTTP use a torchvision weight name "
                "(IMAGENET1K_V1, DEFAULT), 'none', or a stored model as the source"
            )
    for key in SERVER_FIELDS:
        normalised.pop(key, None)
    if not is_registry:
        try:
            version = model_store.resolve(normalised["source"])
        except ModelNotFound as error:
            raise SubmitError(f"source: {normalised['source']!r} is neither a known backbone nor a stored model: {error}", 422) from None
        except TuneserveError as error:
            raise SubmitError(f"source: {error}", 422) from None
        normalised["source"] = version.tag  # pin the version, so a later publish cannot change what this job starts from
    return normalised


def config_schema() -> dict[str, Any]:
    """The JSON schema of the `config` form field: TrainConfig's fields, types and choices, less the
    fields the server sets. Ranges and cross-field rules are checked by `TrainConfig.validate` (422)."""
    from models import train_config

    schema = _CONFIG_TYPES.json_schema()
    for key in SERVER_FIELDS:
        schema["properties"].pop(key, None)
    properties = schema["properties"]
    properties["name"].update(pattern=MODEL_NAME, description="The model to publish (a stored model name)")
    properties["strategy"]["enum"] = list(train_config.STRATEGIES)
    properties["class_balance"]["enum"] = list(train_config.CLASS_BALANCE)
    properties["device"]["enum"] = list(train_config.DEVICES)
    schema.update(required=["name"], additionalProperties=False)
    schema.pop("title", None)
    return schema


def _check_types(raw: dict[str, Any]) -> None:
    """Each known field has its declared JSON type (a string where a string belongs, …), or 422."""
    problems = []
    for key, value in raw.items():
        if key not in _FIELD_TYPES:
            continue  # TrainConfig.from_dict names unknown fields
        try:
            _FIELD_TYPES[key].validate_python(value, strict=True)
        except ValidationError as error:
            problems.append(f"{key}: {error.errors()[0]['msg']}")
    if problems:
        raise SubmitError(f"config: {'; '.join(problems)}")


# -- dataset checks ---------------------------------------------------------------------------
def check_dataset(directory: Path, settings: FinetuneSettings, min_per_class: int,
                  config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Layout, classes, per-class counts, split labels, the split training will make (with the
    config's fractions and seed), and every image decodes; → a summary."""
    from models.datasets import check_trainable, load_samples, split_origins, split_samples
    from models.preprocess import decode_image

    samples = load_samples(directory)
    unlabelled = [s for s in samples if not s.label]
    if unlabelled:
        raise DatasetError(f"{len(unlabelled)} images have no label, e.g. {_rel(unlabelled[0].path, directory)}")
    counts = check_trainable(samples, min_per_class=min_per_class)
    config = config or {}
    splits = split_samples(samples, config.get("val_fraction", 0.15), config.get("test_fraction", 0.15), config.get("seed", 0))
    bad = []
    for sample in samples:
        try:
            decode_image(sample.path, max_pixels=settings.max_pixels, allowed_formats=settings.allowed_formats)
        except TuneserveError as error:
            bad.append(f"{_rel(sample.path, directory)}: {error}")
    if bad:
        shown = "; ".join(bad[:MAX_BAD_PATHS])
        more = f" (and {len(bad) - MAX_BAD_PATHS} more)" if len(bad) > MAX_BAD_PATHS else ""
        raise DatasetError(f"{len(bad)} of {len(samples)} images cannot be used: {shown}{more}")
    origins = split_origins(samples, splits)
    return {"images": len(samples), "classes": len(counts), "per_class": counts, "splits": origins["given"],
            "splits_derived": origins["derived"], "split_sizes": {name: len(group) for name, group in splits.items()}}


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return Path(path).name


def resolve_data_path(value: str, settings: FinetuneSettings) -> Path:
    if settings.data_root is None:
        raise SubmitError("data_path is disabled: no data root is configured (TUNESERVE_DATA_ROOT)", 400)
    return inside_root(settings.data_root, value)


# -- submission (shared by every job kind: service/routes/advise.py uses it too) ---------------
Validator = Callable[[Any], dict[str, Any]]


async def submit_job(request: Request, manager: JobManager, kind: str, validate: Validator, parts: "Submission") -> JSONResponse:
    """Check, store and queue one job of `kind` from its declared form parts; every refusal is a 4xx
    (or 507) naming the problem and leaves nothing behind. The key, quotas and disk budget were
    checked before the body was read (`admit`)."""
    ft = manager.settings
    key_name = request.state.api_key_name
    job_id = new_job_id("ft" if kind == "finetune" else kind[:3])
    job_dir = ft.jobs_dir / job_id
    try:
        config, dataset_dir, summary = await receive_submission(ft, job_id, job_dir, validate, parts)
        job_dir.mkdir(parents=True, exist_ok=True)
        job = manager.store.create(config, dataset_dir, job_dir, job_id, submitted_by=key_name, quota=ft, kind=kind)
        (job_dir / "dataset.json").write_text(json.dumps(summary, indent=2))
        manager.wake()
        body = {"job_id": job.id, "kind": kind, "state": job.state, "dataset": summary, "config": config}
        return JSONResponse(body, status_code=202, headers={"Location": f"/{kind}/{job.id}"})
    except TuneserveError as error:
        shutil.rmtree(job_dir, ignore_errors=True)
        return _error(error)
    except Exception as error:
        shutil.rmtree(job_dir, ignore_errors=True)
        if is_disk_full(error):  # the upload, the unpacking or the job database write
            return _error(quotas.InsufficientStorage(f"no space left to store this submission ({error}); nothing was queued"))
        raise
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    finally:
        (ft.uploads_dir / f"{job_id}.zip").unlink(missing_ok=True)


class Submission:
    """The declared form parts of a job submission (POST /finetune, POST /advise)."""

    def __init__(self, config: str, dataset: UploadFile | None, data_path: str | None):
        self.config, self.dataset, self.data_path = config, dataset, data_path


async def receive_submission(ft: FinetuneSettings, job_id: str, job_dir: Path, validate: Validator,
                             parts: Submission) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """`config` + (`dataset` zip | `data_path`) → (validated config, dataset folder, dataset summary)."""
    config = validate(parts.config)
    if (parts.dataset is None) == (parts.data_path is None):
        raise SubmitError("send exactly one of `dataset` (zip upload) or `data_path` (inside the data root)", 400)
    if parts.dataset is not None:
        dataset_dir = await run_in_threadpool(save_and_extract, ft, parts.dataset.file, job_id, job_dir)
    else:
        dataset_dir = resolve_data_path(parts.data_path, ft)
    min_per_class = max(ft.min_per_class, int(config.get("min_images_per_class") or 2))
    summary = await run_in_threadpool(check_dataset, dataset_dir, ft, min_per_class, config)
    return config, dataset_dir, summary


def submission_route(manager: JobManager, require_write: Callable, config_help: str, schema: dict[str, Any]):
    """(route class, POST options, the form parts as a dependency) for a job kind's submit route."""

    async def admit(request: Request):
        """Key, quotas (429) and disk budget (507) before a byte of the upload is read; → a `receive`
        that keeps a body sent without Content-Length within the upload limit and the budget."""
        key_name = call_auth(require_write, request)
        room = await run_in_threadpool(_precheck, request, manager.settings, manager.store, key_name)
        return _limited_receive(request.receive, manager.settings, room)

    def parts(
        config: Annotated[str, Form(description=config_help)],
        dataset: Annotated[UploadFile | None, File(description="A zip of labelled images (`label/image.jpg` or `split/label/image.jpg`)")] = None,
        data_path: Annotated[str | None, Form(pattern=NO_NUL, description="Or a folder of labelled images under the data root")] = None,
    ) -> Submission:
        return Submission(config, dataset, data_path)

    options = dict(
        status_code=202,
        dependencies=[Depends(require_write)],
        responses=errors(400, 401, 403, 404, 409, 413, 415, 422, 429, 507),
        form_limits={"max_files": 1, "max_fields": 10},
        openapi_extra={**exactly_one_of("dataset", "data_path"), **json_form_part("config", schema)},
    )
    return form_route(admit), options, Annotated[Submission, Depends(parts)]


def _limited_receive(receive, ft: FinetuneSettings, room: int):
    received = 0

    async def limited():
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > ft.max_upload_bytes:
            raise SubmitError(f"upload exceeds the limit of {ft.max_upload_bytes} bytes", 413)
        if received > room:
            raise quotas.InsufficientStorage(f"upload passes the fine-tune disk budget: {room} bytes are left")
        return message

    return limited


def save_and_extract(ft: FinetuneSettings, upload, job_id: str, job_dir: Path) -> Path:
    from models.datasets import ZipLimits, safe_extract_zip

    archive = ft.uploads_dir / f"{job_id}.zip"
    written = 0
    with archive.open("wb") as out:
        while chunk := upload.read(1024 * 1024):
            written += len(chunk)
            if written > ft.max_upload_bytes:
                raise SubmitError(f"dataset exceeds the upload limit of {ft.max_upload_bytes} bytes", 413)
            out.write(chunk)
    quotas.check_disk(ft, _zip_unpacked_bytes(archive))  # the archive is counted already
    limits = ZipLimits(max_archive_bytes=ft.max_upload_bytes, max_entries=ft.max_entries, max_unpacked_bytes=ft.max_unpacked_bytes)
    job_dir.mkdir(parents=True, exist_ok=True)
    return safe_extract_zip(archive, job_dir / "dataset", limits)


# -- the router -------------------------------------------------------------------------------
_error = error_response


def _precheck(request: Request, ft: FinetuneSettings, jobs: JobStore, key_name: str) -> int:
    """Quotas (429) and the disk budget (507), before a byte of the upload is read; → bytes left in the budget."""
    per_key, everyone = jobs.active(key_name), jobs.active()
    quotas.check_job_counts(len(per_key), len(everyone), key_name, ft, quotas.retry_after(everyone))
    length = request.headers.get("content-length")
    return quotas.check_disk(ft, int(length) if length and length.isdigit() else 0)


def _zip_unpacked_bytes(archive: Path) -> int:
    import zipfile

    try:
        with zipfile.ZipFile(archive) as bundle:
            return sum(info.file_size for info in bundle.infolist())
    except (zipfile.BadZipFile, OSError):
        return 0  # safe_extract_zip names the problem


def build_router(manager: JobManager, settings: Any = None) -> APIRouter:
    ft = manager.settings
    auth = settings if settings is not None else ft  # the service Settings or FinetuneSettings: both carry the key
    require_write = require_api_key(auth)
    write, read = [Depends(require_write)], [Depends(require_read_access(auth))]
    route_class, submit_options, Parts = submission_route(
        manager, require_write, "The training config (JSON); `name` is the model to publish", config_schema()
    )
    router = APIRouter(tags=["finetune"], route_class=route_class)
    jobs = manager.store

    def get_job(job_id: str):
        job = jobs.get(job_id)
        if job is None or job.kind != "finetune":
            raise HTTPException(404, f"no fine-tune job {job_id!r}")
        return job

    @router.post("/finetune", response_model=JobSubmitted, **submit_options)
    async def submit(request: Request, parts: Parts):
        """Start a fine-tune job; every check that can fail runs now and answers a 4xx naming the problem."""
        return await submit_job(request, manager, "finetune", validate_config, parts)

    @router.get("/finetune", dependencies=read, response_model=JobList, responses=errors(401, 422))
    def list_jobs(state: JobState | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100):
        """Jobs, newest first; `state` keeps only jobs in that state."""
        return {"jobs": [job.public() for job in jobs.list(state, limit, kind="finetune")]}

    @router.get("/finetune/{job_id}", dependencies=read, response_model=Job, responses=JOB_ERRORS)
    def show(job_id: JobId):
        """One job: state, phase, progress, timestamps, and the published model with its eval, or the error."""
        return get_job(job_id).public()

    @router.get(
        "/finetune/{job_id}/log",
        dependencies=read,
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **JOB_ERRORS},
    )
    def show_log(job_id: JobId, lines: Annotated[int, Query(ge=1, le=5000)] = 50):
        """The last `lines` lines of the job's training log."""
        job = get_job(job_id)
        return _tail(Path(job.job_dir) / "train.log", lines)

    @router.post(
        "/finetune/{job_id}/cancel",
        dependencies=write,
        response_model=Job,
        responses={202: {"model": Job, "description": "Stopping: the job was running"}, **JOB_ERRORS, **errors(409)},
    )
    def cancel(job_id: JobId):
        """Stop a queued or running job (no model is published); 202 while a running job stops."""
        return cancel_job(jobs, get_job(job_id))

    @router.post(
        "/finetune/{job_id}/resume", status_code=202, dependencies=write, response_model=Job, responses={**JOB_ERRORS, **errors(409, 429)}
    )
    def resume(job_id: JobId):
        """Requeue an interrupted, failed or cancelled job; it continues from its last epoch checkpoint."""
        return resume_job(manager, get_job(job_id))

    @router.delete("/finetune/{job_id}", dependencies=write, response_model=JobDeleted, responses={**JOB_ERRORS, **errors(409)})
    def delete(job_id: JobId):
        """Forget a finished, failed, cancelled or interrupted job and free its disk (dataset copy,
        checkpoints, logs). Published model versions are not touched."""
        return delete_job(jobs, ft, get_job(job_id))

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
        return _error(error)
    if not requeued:
        return JSONResponse({"error": f"job {job.id} changed state; try again"}, status_code=409)
    manager.wake()
    return manager.store.get(job.id).public()


def delete_job(jobs: JobStore, ft: FinetuneSettings, job: StoredJob) -> JSONResponse | dict[str, Any]:
    if not jobs.delete(job.id):
        return JSONResponse({"error": f"job {job.id} is {job.state}; cancel it first"}, status_code=409)
    job_dir = Path(job.job_dir).resolve()
    if job_dir.is_relative_to(ft.jobs_dir.resolve()):
        shutil.rmtree(job_dir, ignore_errors=True)
    return {"job_id": job.id, "deleted": True, "state": job.state}


def unavailable_router(reason: str, prefixes: tuple[str, ...] = ("/finetune", "/advise")) -> APIRouter:
    """Every job route (/finetune, /advise) answers 501 with `reason` (a serve-only server, or jobs
    turned off), instead of a 404 that would hide why."""
    router = APIRouter()

    async def _unavailable() -> JSONResponse:
        return JSONResponse({"error": reason}, status_code=501)

    for prefix in prefixes:
        router.add_api_route(prefix, _unavailable, methods=["GET", "POST"], include_in_schema=False)
        router.add_api_route(prefix + "/{rest:path}", _unavailable, methods=["GET", "POST", "DELETE"], include_in_schema=False)
    return router
