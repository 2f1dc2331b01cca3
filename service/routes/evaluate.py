"""POST /evaluate: labelled images (a zip upload or a folder under the data root) → eval report.

An open route (a key only with TUNESERVE_PROTECT_READS), so it is bounded (docs/security.md): one
evaluation at a time per worker (429 + Retry-After), at most `evaluate_max_images` images (413),
a zip's unpacked size at most `evaluate_max_unpacked_mb` and charged to the fine-tune disk budget
(507) while it exists, and its images go through the admission-controlled data plane.
"""
import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile

from models.data.datasets import ZipLimits
from models.errors import DatasetError, TuneserveError
from service.auth import require_read_access
from service.config import Settings
from service.finetune import quotas
from service.jobs.uploads import DATASET_HELP, ZIP_MEDIA_TYPE, unpack_upload
from service.limits import inside_root
from service.dataplane import BoundModel, DataPlane
from service.pool import count_request
from service.routes.forms import (
    NO_NUL, UPLOAD_ERRORS, before_body, errors, exactly_one_of, file_form_part, form_route, form_rules, model_field, plane_of,
    top_k_field,
)
from service.schemas import EvalReport


class EvaluationBusy(TuneserveError):
    """Another evaluation is running in this worker (429)."""

    status = 429
    headers = {"Retry-After": "5"}


class TooManyImages(TuneserveError):
    status = 413


def build_router(settings: Settings) -> APIRouter:
    read = require_read_access(settings)
    running = asyncio.Event()  # set while this worker evaluates (one at a time: its images share the batcher)
    router = APIRouter(tags=["evaluate"], route_class=form_route(before_body(read)), dependencies=[Depends(read)])

    @router.post(
        "/evaluate",
        response_model=EvalReport,
        responses={**UPLOAD_ERRORS, **errors(403, 429, 507)},
        form_limits={"max_files": 1, "max_fields": 10},
        openapi_extra=form_rules(exactly_one_of("dataset", "data_path"), file_form_part("dataset", ZIP_MEDIA_TYPE, DATASET_HELP)),
    )
    async def evaluate_route(
        request: Request,
        plane: Annotated[DataPlane, Depends(plane_of)],
        dataset: Annotated[UploadFile | None, File(description=DATASET_HELP)] = None,
        data_path: Annotated[str | None, Form(pattern=NO_NUL, description="Or a folder of labelled images, relative to the data root")] = None,
        top_k: top_k_field(settings) = settings.default_top_k,
        split: Annotated[Literal["train", "val", "test"] | None, Form(description="Evaluate on this split only")] = None,
        model: model_field() = None,
        compare_with: model_field("Also evaluate this model on the images whose labels it knows, and report the difference") = None,
    ) -> dict[str, Any]:
        """Labelled images (a zip `dataset` or a `data_path` under the data root) → the eval.json report."""
        if (dataset is None) == (data_path is None):
            raise HTTPException(400, "send exactly one of 'dataset' (a zip upload) or 'data_path' (under the data root)")
        if running.is_set():
            raise EvaluationBusy("another evaluation is running in this worker; one runs at a time (retry in a few seconds)")
        running.set()
        try:
            return await _evaluate_route(request, plane, dataset, data_path, top_k, split, model, compare_with)
        finally:
            running.clear()

    async def _evaluate_route(request, plane, dataset, data_path, top_k, split, model, compare_with) -> dict[str, Any]:
        classifier = await plane.resolve(model)
        request.state.model = classifier.name
        other = await plane.resolve(compare_with) if compare_with else None
        loop = asyncio.get_running_loop()  # the images go through the data plane (its batcher), from the thread below
        classifier, other = BoundModel(plane, classifier, loop), other and BoundModel(plane, other, loop)

        settings.uploads_dir.mkdir(parents=True, exist_ok=True)  # scratch counts in the disk budget while it exists
        scratch = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="evaluate-", dir=settings.uploads_dir))
        try:
            if dataset is not None:
                root = await _extract_upload(dataset, scratch, settings)
            else:
                root = inside_root(settings.data_root, data_path)
            report = await asyncio.to_thread(_evaluate, root, split, classifier, other, top_k, settings)
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)
        report["unreadable"] = {
            str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else p: e
            for p, e in (report.get("unreadable") or {}).items()
        }
        count_request("evaluate", classifier.name, "ok")
        return report

    return router


async def _extract_upload(upload, scratch: Path, settings: Settings) -> Path:
    """The uploaded zip, saved and extracted under `scratch` within the zip limits (service/jobs/uploads.py)."""
    limits = ZipLimits(
        max_archive_bytes=settings.max_body_bytes,
        max_entries=min(settings.max_zip_entries, settings.evaluate_max_images + 1000),  # + folders
        max_unpacked_bytes=min(settings.max_unpacked_bytes, settings.evaluate_max_unpacked_bytes),
    )

    def within_budget(unpacked: int) -> None:  # 507 before a byte is unpacked beyond the disk budget
        quotas.check_disk(settings, unpacked)

    return await asyncio.to_thread(unpack_upload, upload.file, scratch / "dataset.zip", scratch / "data", limits, within_budget)


def _evaluate(root: Path, split: str | None, model, other, top_k: int, settings: Settings) -> dict[str, Any]:
    from models.data.datasets import load_samples
    from models.data.evaluate import evaluate, evaluate_compare

    decode_limits = {"max_pixels": settings.max_pixels, "allowed_formats": settings.allowed_formats}
    samples = load_samples(root)
    if len(samples) > settings.evaluate_max_images:
        raise TooManyImages(f"the dataset holds {len(samples)} images; /evaluate takes at most {settings.evaluate_max_images} "
                            "(TUNESERVE_EVALUATE_MAX_IMAGES): score larger sets in batch with `tuneserve score`")
    if split:
        samples = [s for s in samples if s.split == split]
        if not samples:
            raise DatasetError(f"no samples in split {split!r}")
    if other is not None:
        return evaluate_compare(model, other, samples, top_k, **decode_limits)
    return evaluate(model, samples, top_k, **decode_limits)
