"""What every upload route shares: the worker's pool, the multipart form, and its common fields."""
from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.decision import MinConfidence, check_supported, parse_min_confidence
from models.runtime import OnnxClassifier
from service.config import Settings
from service.pool import ModelPool


def pool_of(request: Request) -> ModelPool:
    pool = getattr(request.app.state, "pool", None)
    if pool is None:
        raise HTTPException(503, "the service is starting; models are not loaded yet")
    return pool


async def read_form(request: Request, max_files: int):
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise HTTPException(415, f"expected multipart/form-data, got {content_type or 'no content type'}")
    try:
        return await request.form(max_files=max_files, max_fields=100)
    except StarletteHTTPException as error:
        if "Too many files" in str(error.detail):  # Starlette says 400; the limit is ours to name
            raise HTTPException(413, f"too many files in one request; limit is {max_files - 1 or 1}") from None
        raise
    except Exception as error:  # multipart parse errors
        raise HTTPException(400, f"cannot parse the multipart body: {error}") from None


def text_field(form, request: Request, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        value = request.query_params.get(name)
    if isinstance(value, UploadFile):
        raise HTTPException(400, f"'{name}' must be a text field, not a file")
    return value.strip() if isinstance(value, str) and value.strip() else None


def top_k_field(form, request: Request, settings: Settings) -> int:
    raw = text_field(form, request, "top_k")
    if raw is None:
        return settings.default_top_k
    try:
        value = int(raw)
    except ValueError:
        raise HTTPException(422, f"top_k must be an integer, got {raw!r}") from None
    if not 1 <= value <= settings.max_top_k:
        raise HTTPException(422, f"top_k must be between 1 and {settings.max_top_k}, got {value}")
    return value


def min_confidence_field(form, request: Request, classifier: OnnxClassifier) -> MinConfidence:
    """`min_confidence`: a probability, or `auto` (needs the version's per-label thresholds); 422 otherwise."""
    value = parse_min_confidence(text_field(form, request, "min_confidence"))
    check_supported(value, classifier.manifest, classifier.tag)
    return value


def upload_field(value: Any, field: str) -> UploadFile:
    if isinstance(value, UploadFile):
        return value
    if isinstance(value, str):
        raise HTTPException(
            400, f"'{field}' must be an uploaded file (multipart file part); text and URLs are not accepted"
        )
    raise HTTPException(400, f"missing '{field}': send the image as a multipart file field named '{field}'")
