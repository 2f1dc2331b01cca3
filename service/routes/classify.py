"""POST /classify (one image) and POST /classify_batch (several, one result each)."""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from starlette.datastructures import UploadFile

from models.errors import ImageError
from service.auth import require_read_access
from service.config import Settings
from service.pool import count_request
from service.schemas import BatchItem, BatchItemError, BatchResult, Classification
from service.routes.forms import min_confidence_field, pool_of, read_form, text_field, top_k_field, upload_field


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["classify"], dependencies=[Depends(require_read_access(settings))])

    @router.post("/classify", response_model=Classification)
    async def classify(request: Request) -> Classification:
        """One multipart `image`; optional `model` (name or name:version), `top_k` and `min_confidence`
        (a probability, or `auto`: below it the answer abstains with `label` null)."""
        pool = pool_of(request)
        form = await read_form(request, max_files=1)
        upload = upload_field(form.get("image"), "image")
        top_k = top_k_field(form, request, settings)
        classifier = await pool.get(text_field(form, request, "model"))
        request.state.model = classifier.name
        min_confidence = min_confidence_field(form, request, classifier)
        prediction = await pool.classify(classifier, await upload.read(), top_k, min_confidence)
        count_request("classify", classifier.name, "ok")
        return prediction

    @router.post("/classify_batch", response_model=BatchResult)
    async def classify_batch(request: Request) -> BatchResult:
        """Repeated multipart `images`; one result per image, in order; a bad image gets its own error."""
        pool = pool_of(request)
        form = await read_form(request, max_files=settings.max_batch + 1)
        images = form.getlist("images")
        if not images:
            raise HTTPException(400, "missing 'images': send one or more multipart file fields named 'images'")
        if len(images) > settings.max_batch:
            raise HTTPException(
                413, f"too many images: {len(images)}; limit is {settings.max_batch} (TUNESERVE_MAX_BATCH)"
            )
        top_k = top_k_field(form, request, settings)
        classifier = await pool.get(text_field(form, request, "model"))
        request.state.model = classifier.name
        min_confidence = min_confidence_field(form, request, classifier)

        async def one(value: Any) -> BatchItem | BatchItemError:
            name = value.filename if isinstance(value, UploadFile) else None
            try:
                upload = upload_field(value, "images")
                prediction = await pool.classify(classifier, await upload.read(), top_k, min_confidence)
                return BatchItem(filename=name, **prediction.model_dump())
            except (ImageError, HTTPException) as error:
                status = error.status if isinstance(error, ImageError) else error.status_code
                message = str(error) if isinstance(error, ImageError) else error.detail
                return BatchItemError(filename=name, error=message, status=status)

        results = await asyncio.gather(*(one(value) for value in images))
        failed = sum(1 for r in results if isinstance(r, BatchItemError))
        count_request("classify_batch", classifier.name, "ok" if not failed else "partial")
        return BatchResult(
            model=classifier.name,
            version=classifier.version,
            variant=classifier.variant,
            results=results,
            succeeded=len(results) - failed,
            failed=failed,
        )

    return router
