"""REST routes for fine-tune jobs (FastAPI); service/app.py includes them when jobs are available.

POST /finetune                 multipart: `dataset` (zip) or `data_path` (inside the data root), `config` JSON → 202
GET  /finetune?state=&limit=   jobs, newest first
GET  /finetune/{job_id}        one job: state, phase, progress, timestamps, model + eval or error
GET  /finetune/{job_id}/log    the tail of the job's training log (text)
POST /finetune/{job_id}/cancel stop a queued or running job (no model is published)
POST /finetune/{job_id}/resume requeue an interrupted/failed/cancelled job; continues from its last epoch checkpoint

Every check that can fail runs at submit time and answers a 4xx naming the problem.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from models.errors import DatasetError, ModelNotFound, TuneserveError, is_disk_full
from models.train_config import TrainConfig
from service.auth import require_api_key, require_read_access
from service.finetune import quotas
from service.finetune.runner import JobManager, _tail
from service.finetune.settings import FinetuneSettings
from service.finetune.store import ENDED_STATES, RESUMABLE_STATES, STATES, JobStore, new_job_id
from service.limits import inside_root

# Fields the server fills in itself; a client must not point training at arbitrary paths.
SERVER_FIELDS = ("data", "output_dir")
WEIGHT_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
MAX_BAD_PATHS = 20


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


async def submit_job(request: Request, manager: JobManager, kind: str, validate: Validator, key_name: str) -> JSONResponse:
    """Check quotas and disk, parse, check and queue one job of `kind`; every refusal is a 4xx (or 507)
    naming the problem and leaves nothing behind."""
    ft = manager.settings
    job_id = new_job_id("ft" if kind == "finetune" else kind[:3])
    job_dir = ft.jobs_dir / job_id
    try:
        room = await run_in_threadpool(_precheck, request, ft, manager.store, key_name)
        config, dataset_dir, summary = await receive_submission(request, ft, job_id, job_dir, validate, room)
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


async def receive_submission(request: Request, ft: FinetuneSettings, job_id: str, job_dir: Path, validate: Validator,
                             room: int) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """multipart `config` + (`dataset` zip | `data_path`) → (validated config, dataset folder, dataset summary)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > ft.max_upload_bytes:
        raise SubmitError(f"upload is {int(length)} bytes; limit is {ft.max_upload_bytes}", 413)
    if "multipart/form-data" not in request.headers.get("content-type", ""):
        raise SubmitError("send multipart/form-data with `config` and either `dataset` (zip) or `data_path`", 415)
    received = 0

    async def limited_receive():
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > ft.max_upload_bytes:
            raise SubmitError(f"upload exceeds the limit of {ft.max_upload_bytes} bytes", 413)
        if received > room:  # a body sent without Content-Length
            raise quotas.InsufficientStorage(f"upload passes the fine-tune disk budget: {room} bytes are left")
        return message

    try:
        form = await Request(request.scope, limited_receive).form(max_files=2, max_fields=20)
    except TuneserveError:
        raise
    except Exception as error:
        raise SubmitError(f"cannot parse the multipart body: {error}", 400) from None
    try:
        config = validate(form.get("config") or "{}")
        dataset = form.get("dataset")
        data_path = form.get("data_path")
        if dataset is not None and isinstance(dataset, str):
            raise SubmitError("`dataset` must be a file upload (a zip); use `data_path` for a folder on the server", 400)
        if (dataset is None) == (not data_path):
            raise SubmitError("send exactly one of `dataset` (zip upload) or `data_path` (inside the data root)", 400)
        if dataset is not None:
            dataset_dir = await run_in_threadpool(save_and_extract, ft, dataset.file, job_id, job_dir)
        else:
            dataset_dir = resolve_data_path(str(data_path), ft)
        min_per_class = max(ft.min_per_class, int(config.get("min_images_per_class") or 2))
        summary = await run_in_threadpool(check_dataset, dataset_dir, ft, min_per_class, config)
    finally:
        await form.close()
    return config, dataset_dir, summary


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
def _error(error: TuneserveError) -> JSONResponse:
    return JSONResponse({"error": str(error)}, status_code=getattr(error, "status", 400), headers=getattr(error, "headers", None))


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
    require_write, require_read = require_api_key(auth), require_read_access(auth)
    router = APIRouter(tags=["finetune"])
    jobs = manager.store

    def get_job(job_id: str):
        job = jobs.get(job_id)
        if job is None or job.kind != "finetune":
            raise HTTPException(404, f"no fine-tune job {job_id!r}")
        return job

    @router.post("/finetune", status_code=202)
    async def submit(request: Request, key_name: str = Depends(require_write)):
        return await submit_job(request, manager, "finetune", validate_config, key_name)

    @router.get("/finetune", dependencies=[Depends(require_read)])
    def list_jobs(state: str | None = Query(None), limit: int = Query(100, ge=1, le=1000)):
        if state is not None and state not in STATES:
            raise HTTPException(422, f"state must be one of {list(STATES)}, got {state!r}")
        return {"jobs": [job.public() for job in jobs.list(state, limit, kind="finetune")]}

    @router.get("/finetune/{job_id}", dependencies=[Depends(require_read)])
    def show(job_id: str):
        return get_job(job_id).public()

    @router.get("/finetune/{job_id}/log", dependencies=[Depends(require_read)], response_class=PlainTextResponse)
    def show_log(job_id: str, lines: int = Query(50, ge=1, le=5000)):
        job = get_job(job_id)
        return _tail(Path(job.job_dir) / "train.log", lines)

    @router.post("/finetune/{job_id}/cancel", dependencies=[Depends(require_write)])
    def cancel(job_id: str):
        job = get_job(job_id)
        if job.state in ENDED_STATES:
            return JSONResponse({"error": f"job {job_id} is already {job.state}", **job.public()}, status_code=409)
        job = jobs.request_cancel(job_id)
        return JSONResponse(job.public(), status_code=202 if job.state == "running" else 200)

    @router.post("/finetune/{job_id}/resume", status_code=202, dependencies=[Depends(require_write)])
    def resume(job_id: str):
        job = get_job(job_id)
        if job.state not in RESUMABLE_STATES:
            return JSONResponse(
                {"error": f"job {job_id} is {job.state}; only {sorted(RESUMABLE_STATES)} jobs can be resumed"}, status_code=409
            )
        if not Path(job.dataset_dir).exists():
            return JSONResponse({"error": f"job {job_id}: its dataset is gone ({job.dataset_dir})"}, status_code=409)
        try:
            requeued = jobs.requeue_for_resume(job_id, quota=ft)
        except quotas.QuotaExceeded as error:
            return _error(error)
        if not requeued:
            return JSONResponse({"error": f"job {job_id} changed state; try again"}, status_code=409)
        manager.wake()
        return jobs.get(job_id).public()

    @router.delete("/finetune/{job_id}", dependencies=[Depends(require_write)])
    def delete(job_id: str):
        """Forget a finished, failed, cancelled or interrupted job and free its disk (dataset copy,
        checkpoints, logs). Published model versions are not touched."""
        job = get_job(job_id)
        if not jobs.delete(job_id):
            return JSONResponse({"error": f"job {job_id} is {job.state}; cancel it first"}, status_code=409)
        job_dir = Path(job.job_dir).resolve()
        if job_dir.is_relative_to(ft.jobs_dir.resolve()):
            shutil.rmtree(job_dir, ignore_errors=True)
        return {"job_id": job_id, "deleted": True, "state": job.state}

    return router


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
