"""POST /classify (one image) and POST /classify_batch (several, one result each): multipart in,
`Prediction`s out; the inference is service/dataplane.py's."""
from typing import Annotated

from fastapi import APIRouter, Depends, File, Request, UploadFile

from service.auth import require_read_access
from service.config import Settings
from service.dataplane import DataPlane, InferenceRequest
from service.explain import EXPLAIN_ERRORS, ExplainForm, explain_ask, with_evidence
from service.pool import count_request
from service.routes.forms import (
    MIN_CONFIDENCE_SCHEMA, UPLOAD_ERRORS, before_body, form_part, form_route, min_confidence_field, model_field, plane_of, top_k_field,
)
from service.schemas import BatchItem, BatchItemError, BatchResult, Classification


def build_router(settings: Settings) -> APIRouter:
    read = require_read_access(settings)
    router = APIRouter(tags=["classify"], route_class=form_route(before_body(read)), dependencies=[Depends(read)])
    TopK = top_k_field(settings)
    Model = model_field()
    MinConfidence = min_confidence_field()
    Plane = Annotated[DataPlane, Depends(plane_of)]

    @router.post(
        "/classify",
        response_model=Classification,
        responses={**UPLOAD_ERRORS, **EXPLAIN_ERRORS},
        form_limits={"max_files": 1, "max_fields": 10},
        openapi_extra=form_part("min_confidence", MIN_CONFIDENCE_SCHEMA),
    )
    async def classify(
        request: Request,
        plane: Plane,
        explain: ExplainForm,
        image: Annotated[UploadFile, File(description="The image (JPEG, PNG, WebP, …), as a multipart file")],
        top_k: TopK = settings.default_top_k,
        model: Model = None,
        min_confidence: MinConfidence = None,
    ) -> Classification:
        """Classify one image with `model` (the default model when absent)."""
        classifier = await plane.resolve(model)
        request.state.model = classifier.name
        ask = explain_ask(classifier, explain)
        asked = InferenceRequest(model=classifier, images=[await image.read()], outputs=ask.outputs(),
                                 top_k=top_k, min_confidence=min_confidence)
        answer = (await plane.infer(asked)).images[0]
        if answer.error is not None:
            raise answer.error
        count_request("classify", classifier.name, "ok")
        return with_evidence(classifier, answer, ask)

    @router.post(
        "/classify_batch",
        response_model=BatchResult,
        responses={**UPLOAD_ERRORS, **EXPLAIN_ERRORS},
        form_limits={"max_files": settings.max_batch + 1, "max_fields": 10},
        openapi_extra=form_part("min_confidence", MIN_CONFIDENCE_SCHEMA),
    )
    async def classify_batch(
        request: Request,
        plane: Plane,
        explain: ExplainForm,
        images: Annotated[
            list[UploadFile],
            File(min_length=1, max_length=settings.max_batch, description=f"1..{settings.max_batch} images, each a multipart file named `images`"),
        ],
        top_k: TopK = settings.default_top_k,
        model: Model = None,
        min_confidence: MinConfidence = None,
    ) -> BatchResult:
        """One result per image, in order; an image that cannot be classified gets its own error."""
        classifier = await plane.resolve(model)
        request.state.model = classifier.name
        ask = explain_ask(classifier, explain)
        asked = InferenceRequest(model=classifier, images=[await upload.read() for upload in images], outputs=ask.outputs(),
                                 top_k=top_k, min_confidence=min_confidence, partial=True)
        answers = (await plane.infer(asked)).images
        results = [
            BatchItem(filename=upload.filename, **with_evidence(classifier, answer, ask).model_dump()) if answer.error is None
            else BatchItemError(filename=upload.filename, error=str(answer.error), status=answer.error.status)
            for upload, answer in zip(images, answers)
        ]
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
