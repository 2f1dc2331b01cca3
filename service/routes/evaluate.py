"""POST /evaluate: labelled images (a zip upload or a folder under the data root) → eval report."""
from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request

from models.errors import DatasetError
from service.auth import require_read_access
from service.config import Settings
from service.limits import inside_root
from service.pool import count_request
from service.routes.forms import pool_of, read_form, text_field, top_k_field, upload_field

SPLITS = ("train", "val", "test")


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["evaluate"], dependencies=[Depends(require_read_access(settings))])

    @router.post("/evaluate")
    async def evaluate_route(request: Request) -> dict[str, Any]:
        """Labelled images (zip `dataset` or `data_path` under the data root) → the eval.json report."""
        pool = pool_of(request)
        form = await read_form(request, max_files=1)
        dataset = form.get("dataset")
        data_path = text_field(form, request, "data_path")
        if dataset is not None and data_path is not None:
            raise HTTPException(400, "send either 'dataset' (a zip upload) or 'data_path', not both")
        if dataset is None and data_path is None:
            raise HTTPException(400, "missing data: send 'dataset' (a zip upload) or 'data_path' (under the data root)")
        top_k = top_k_field(form, request, settings)
        split = text_field(form, request, "split")
        if split is not None and split not in SPLITS:
            raise HTTPException(422, f"split must be train, val or test, got {split!r}")
        model = await pool.get(text_field(form, request, "model"))
        request.state.model = model.name
        compare_ref = text_field(form, request, "compare_with")
        other = await pool.get(compare_ref) if compare_ref else None

        with tempfile.TemporaryDirectory(prefix="tuneserve-eval-") as scratch:
            if dataset is not None:
                root = await _extract_upload(upload_field(dataset, "dataset"), Path(scratch), settings)
            else:
                root = inside_root(settings.data_root, data_path)
            report = await asyncio.to_thread(_evaluate, root, split, model, other, top_k, settings)
        report["unreadable"] = {
            str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else p: e
            for p, e in (report.get("unreadable") or {}).items()
        }
        count_request("evaluate", model.name, "ok")
        return report

    return router


async def _extract_upload(upload, scratch: Path, settings: Settings) -> Path:
    """The uploaded zip, saved and extracted under `scratch` within the zip limits."""
    from models.datasets import ZipLimits, safe_extract_zip

    archive = scratch / "dataset.zip"

    def save() -> None:
        upload.file.seek(0)
        with archive.open("wb") as handle:
            shutil.copyfileobj(upload.file, handle)

    await asyncio.to_thread(save)
    limits = ZipLimits(
        max_archive_bytes=settings.max_body_bytes,
        max_entries=settings.max_zip_entries,
        max_unpacked_bytes=settings.max_unpacked_bytes,
    )
    return await asyncio.to_thread(safe_extract_zip, archive, scratch / "data", limits)


def _evaluate(root: Path, split: str | None, model, other, top_k: int, settings: Settings) -> dict[str, Any]:
    from models.datasets import load_samples
    from models.evaluate import evaluate, evaluate_compare

    decode_limits = {"max_pixels": settings.max_pixels, "allowed_formats": settings.allowed_formats}
    samples = load_samples(root)
    if split:
        samples = [s for s in samples if s.split == split]
        if not samples:
            raise DatasetError(f"no samples in split {split!r}")
    if other is not None:
        return evaluate_compare(model, other, samples, top_k, **decode_limits)
    return evaluate(model, samples, top_k, **decode_limits)
