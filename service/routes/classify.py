"""POST /classify (one image) and POST /classify_batch (several, one result each)."""
import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, File, Request, UploadFile

from models.errors import ImageError
from service.auth import require_read_access
from service.config import Settings
from service.pool import ModelPool, count_request
from service.routes.forms import (
    MIN_CONFIDENCE_SCHEMA, UPLOAD_ERRORS, before_body, form_part, form_route, min_confidence_field, min_confidence_of, model_field, pool_of, top_k_field,
)
from service.schemas import BatchItem, BatchItemError, BatchResult, Classification


def build_router(settings: Settings) -> APIRouter:
    read = require_read_access(settings)
    router = APIRouter(tags=["classify"], route_class=form_route(before_body(read)), dependencies=[Depends(read)])
    TopK = top_k_field(settings)
    Model = model_field()
    MinConfidence = min_confidence_field()
    Pool = Annotated[ModelPool, Depends(pool_of)]

    @router.post(
        "/classify",
        response_model=Classification,
        responses=UPLOAD_ERRORS,
        form_limits={"max_files": 1, "max_fields": 10},
        openapi_extra=form_part("min_confidence", MIN_CONFIDENCE_SCHEMA),
    )
    async def classify(
        request: Request,
        pool: Pool,
        image: Annotated[UploadFile, File(description="The image (JPEG, PNG, WebP, …), as a multipart file")],
        top_k: TopK = settings.default_top_k,
        model: Model = None,
        min_confidence: MinConfidence = None,
    ) -> Classification:
        """Classify one image with `model` (the default model when absent)."""
        classifier = await pool.get(model)
        request.state.model = classifier.name
        threshold = min_confidence_of(min_confidence, classifier)
        prediction = await pool.classify(classifier, await image.read(), top_k, threshold)
        count_request("classify", classifier.name, "ok")
        return prediction

    @router.post(
        "/classify_batch",
        response_model=BatchResult,
        responses=UPLOAD_ERRORS,
        form_limits={"max_files": settings.max_batch + 1, "max_fields": 10},
        openapi_extra=form_part("min_confidence", MIN_CONFIDENCE_SCHEMA),
    )
    async def classify_batch(
        request: Request,
        pool: Pool,
        images: Annotated[
            list[UploadFile],
            File(min_length=1, max_length=settings.max_batch, description=f"1..{settings.max_batch} images, each a multipart file named `images`"),
        ],
        top_k: TopK = settings.default_top_k,
        model: Model = None,
        min_confidence: MinConfidence = None,
    ) -> BatchResult:
        """One result per image, in order; an image that cannot be classified gets its own error."""
        classifier = await pool.get(model)
        request.state.model = classifier.name
        threshold = min_confidence_of(min_confidence, classifier)

        async def one(upload: UploadFile) -> BatchItem | BatchItemError:
            try:
                prediction = await pool.classify(classifier, await upload.read(), top_k, threshold)
                return BatchItem(filename=upload.filename, **prediction.model_dump())
            except ImageError as error:
                return BatchItemError(filename=upload.filename, error=str(error), status=error.status)

        results = await asyncio.gather(*(one(upload) for upload in images))
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
