"""Submitting a job of any kind: `config` + (`dataset` zip | `data_path`) checked, stored and
queued, or refused with a 4xx (or 507) naming the problem and nothing left behind. The key, the
quotas (429) and the disk budget (507) are checked before a byte of the upload is read."""

import json
import shutil
from pathlib import Path
from typing import Annotated, Any, Callable

from fastapi import Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from models.data.datasets import ZipLimits
from models.errors import TuneserveError, is_disk_full
from service.config import Settings
from service.finetune import quotas
from service.finetune.runner import JobManager
from service.finetune.store import JobStore, new_job_id
from service.jobs.datasets import SubmitError, check_dataset, check_images, resolve_data_path
from service.jobs.kinds import JobKind
from service.jobs.uploads import DATASET_HELP, ZIP_MEDIA_TYPE, limited_receive, unpack_upload
from service.routes.forms import (
    NO_NUL, call_auth, error_response, errors, exactly_one_of, file_form_part, form_route, form_rules, json_form_part,
)

SUBMIT_ERRORS = errors(400, 401, 403, 404, 409, 413, 415, 422, 429, 507)


class Submission:
    """The declared form parts of a job submission (POST /finetune, POST /advise, …)."""

    def __init__(self, config: str, dataset: UploadFile | None, data_path: str | None):
        self.config, self.dataset, self.data_path = config, dataset, data_path


async def submit_job(request: Request, manager: JobManager, kind: JobKind, parts: Submission) -> JSONResponse:
    """Check, store and queue one job of `kind`; → 202 with the job id, or the refusal."""
    ft = manager.settings
    job_id = new_job_id(kind.id_prefix)
    job_dir = ft.jobs_dir / job_id
    try:
        config, dataset_dir, summary = await receive_submission(ft, job_id, job_dir, kind, parts)
        job_dir.mkdir(parents=True, exist_ok=True)
        job = manager.store.create(config, dataset_dir, job_dir, job_id, submitted_by=request.state.api_key_name,
                                   quota=ft, kind=kind.name)
        (job_dir / "dataset.json").write_text(json.dumps(summary, indent=2))
        manager.wake()
        body = {"job_id": job.id, "kind": kind.name, "state": job.state, "dataset": summary, "config": config}
        return JSONResponse(body, status_code=202, headers={"Location": f"/{kind.name}/{job.id}"})
    except TuneserveError as error:
        shutil.rmtree(job_dir, ignore_errors=True)
        return error_response(error)
    except Exception as error:
        shutil.rmtree(job_dir, ignore_errors=True)
        if is_disk_full(error):  # the upload, the unpacking or the job database write
            return error_response(quotas.InsufficientStorage(f"no space left to store this submission ({error}); nothing was queued"))
        raise
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    finally:
        upload_path(ft, job_id).unlink(missing_ok=True)


def upload_path(ft: Settings, job_id: str) -> Path:
    return ft.uploads_dir / f"{job_id}.zip"


async def receive_submission(ft: Settings, job_id: str, job_dir: Path, kind: JobKind,
                             parts: Submission) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """`config` + (`dataset` zip | `data_path`) → (validated config, dataset folder, dataset summary)."""
    config = kind.validate(parts.config)
    if (parts.dataset is None) == (parts.data_path is None):
        raise SubmitError("send exactly one of `dataset` (zip upload) or `data_path` (inside the data root)", 400)
    if parts.dataset is not None:
        limits = ZipLimits(max_archive_bytes=ft.finetune_max_upload_bytes, max_entries=ft.max_zip_entries,
                           max_unpacked_bytes=ft.max_unpacked_bytes)
        dataset_dir = await run_in_threadpool(unpack_upload, parts.dataset.file, upload_path(ft, job_id), job_dir / "dataset",
                                              limits, lambda unpacked: quotas.check_disk(ft, unpacked))  # the archive is counted already
    else:
        dataset_dir = resolve_data_path(parts.data_path, ft)
    if not kind.labelled:
        return config, dataset_dir, await run_in_threadpool(check_images, dataset_dir, ft)
    min_per_class = max(ft.finetune_min_per_class, int(config.get("min_images_per_class") or 2))
    summary = await run_in_threadpool(check_dataset, dataset_dir, ft, min_per_class, config)
    return config, dataset_dir, summary


def submission_route(manager: JobManager, kind: JobKind, require_write: Callable):
    """(route class, POST options, the form parts as a dependency) for a kind's submit route."""

    async def admit(request: Request):
        """Key, quotas (429) and disk budget (507) before a byte of the upload is read; → a `receive`
        that keeps a body sent without Content-Length within the upload limit and the budget."""
        key_name = call_auth(require_write, request)
        room = await run_in_threadpool(precheck, request, manager.settings, manager.store, key_name)

        def over_budget(received: int) -> Exception | None:
            if received > room:
                return quotas.InsufficientStorage(f"upload passes the fine-tune disk budget: {room} bytes are left")
            return None

        return limited_receive(request.receive, manager.settings.finetune_max_upload_bytes, over_budget)

    def parts(
        config: Annotated[str, Form(description=kind.config_help)],
        dataset: Annotated[UploadFile | None, File(description=DATASET_HELP)] = None,
        data_path: Annotated[str | None, Form(pattern=NO_NUL, description="Or a folder of labelled images under the data root")] = None,
    ) -> Submission:
        return Submission(config, dataset, data_path)

    options = dict(
        status_code=202,
        dependencies=[Depends(require_write)],
        responses=SUBMIT_ERRORS,
        form_limits={"max_files": 1, "max_fields": 10},
        openapi_extra=form_rules(exactly_one_of("dataset", "data_path"), json_form_part("config", kind.config_schema()),
                                 file_form_part("dataset", ZIP_MEDIA_TYPE, DATASET_HELP)),
    )
    return form_route(admit), options, Annotated[Submission, Depends(parts)]


def precheck(request: Request, ft: Settings, jobs: JobStore, key_name: str) -> int:
    """Quotas (429) and the disk budget (507), before a byte of the upload is read; → bytes left in the budget."""
    per_key, everyone = jobs.active(key_name), jobs.active()
    quotas.check_job_counts(len(per_key), len(everyone), key_name, ft, quotas.retry_after(everyone))
    length = request.headers.get("content-length")
    return quotas.check_disk(ft, int(length) if length and length.isdigit() else 0)
