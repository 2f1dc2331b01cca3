"""The REST routes (FastAPI), mounted into the BentoML service by service/service.py.

Uploads are taken as raw multipart files and decoded here (never as PIL parameters, which 500 on
corrupt input, nor as file parameters, which fetch URLs). Every refusal is a 4xx with
`{"error": "..."}` naming the problem; `models.errors.*.status` gives the status.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from models import store
from models.errors import DatasetError, ImageError, TuneserveError
from service.auth import require_api_key, require_read_access
from service.config import Settings
from service.limits import inside_root
from service.models_pool import ModelPool, metrics

log = logging.getLogger("tuneserve.service")


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


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


def _text_field(form, request: Request, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        value = request.query_params.get(name)
    if isinstance(value, UploadFile):
        raise HTTPException(400, f"'{name}' must be a text field, not a file")
    return value.strip() if isinstance(value, str) and value.strip() else None


def _top_k(form, request: Request, settings: Settings) -> int:
    raw = _text_field(form, request, "top_k")
    if raw is None:
        return settings.default_top_k
    try:
        value = int(raw)
    except ValueError:
        raise HTTPException(422, f"top_k must be an integer, got {raw!r}") from None
    if not 1 <= value <= settings.max_top_k:
        raise HTTPException(422, f"top_k must be between 1 and {settings.max_top_k}, got {value}")
    return value


def _upload(value: Any, field: str) -> UploadFile:
    if isinstance(value, UploadFile):
        return value
    if isinstance(value, str):
        raise HTTPException(
            400, f"'{field}' must be an uploaded file (multipart file part); text and URLs are not accepted"
        )
    raise HTTPException(400, f"missing '{field}': send the image as a multipart file field named '{field}'")


def _count(route: str, model: str, outcome: str) -> None:
    try:
        metrics()["requests"].labels(route, model, outcome).inc()
    except Exception:  # metrics must never fail a request
        pass


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="tuneserve",
        description="Classify images with fine-tuned models; evaluate them; fine-tune new ones.",
        docs_url="/api/docs",
        openapi_url="/api/openapi.json",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.pool = None
    read = [Depends(require_read_access(settings))]
    write = [Depends(require_api_key(settings))]

    def _count_refusal(request: Request) -> None:
        route = request.url.path.strip("/")
        if route in ("classify", "classify_batch", "evaluate"):
            _count(route, getattr(request.state, "model", None) or "-", "refused")

    @app.exception_handler(TuneserveError)
    async def _tuneserve_error(request: Request, error: TuneserveError):
        _count_refusal(request)
        return _error(error.status, str(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        if error.status_code < 500:
            _count_refusal(request)
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}" for e in error.errors()
        )
        return _error(422, problems or "invalid request")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception):
        log.exception("unexpected error")
        return _error(500, f"internal error: {type(error).__name__}")

    # ---- classify --------------------------------------------------------------------------
    @app.post("/classify", dependencies=read, tags=["classify"])
    async def classify(request: Request) -> dict[str, Any]:
        """One multipart `image`; optional `model` (name or name:version) and `top_k`."""
        pool = pool_of(request)
        form = await read_form(request, max_files=1)
        upload = _upload(form.get("image"), "image")
        top_k = _top_k(form, request, settings)
        model_ref = _text_field(form, request, "model")
        classifier = await pool.get(model_ref)
        request.state.model = classifier.name
        predictions = await pool.classify(classifier, await upload.read(), top_k)
        _count("classify", classifier.name, "ok")
        return {"model": classifier.name, "version": classifier.version, "predictions": predictions}

    @app.post("/classify_batch", dependencies=read, tags=["classify"])
    async def classify_batch(request: Request) -> dict[str, Any]:
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
        top_k = _top_k(form, request, settings)
        classifier = await pool.get(_text_field(form, request, "model"))
        request.state.model = classifier.name

        async def one(value: Any) -> dict[str, Any]:
            name = value.filename if isinstance(value, UploadFile) else None
            try:
                upload = _upload(value, "images")
                predictions = await pool.classify(classifier, await upload.read(), top_k)
                return {"filename": name, "predictions": predictions}
            except (ImageError, HTTPException) as error:
                status = error.status if isinstance(error, ImageError) else error.status_code
                message = str(error) if isinstance(error, ImageError) else error.detail
                return {"filename": name, "error": message, "status": status}

        results = await asyncio.gather(*(one(value) for value in images))
        failed = sum(1 for r in results if "error" in r)
        _count("classify_batch", classifier.name, "ok" if not failed else "partial")
        return {
            "model": classifier.name,
            "version": classifier.version,
            "results": results,
            "succeeded": len(results) - failed,
            "failed": failed,
        }

    # ---- evaluate --------------------------------------------------------------------------
    @app.post("/evaluate", dependencies=read, tags=["evaluate"])
    async def evaluate_route(request: Request) -> dict[str, Any]:
        """Labelled images (zip `dataset` or `data_path` under the data root) → the eval.json report."""
        from models.datasets import ZipLimits, load_samples, safe_extract_zip
        from models.evaluate import evaluate, evaluate_compare

        pool = pool_of(request)
        form = await read_form(request, max_files=1)
        dataset = form.get("dataset")
        data_path = _text_field(form, request, "data_path")
        if dataset is not None and data_path is not None:
            raise HTTPException(400, "send either 'dataset' (a zip upload) or 'data_path', not both")
        if dataset is None and data_path is None:
            raise HTTPException(400, "missing data: send 'dataset' (a zip upload) or 'data_path' (under the data root)")
        top_k = _top_k(form, request, settings)
        split = _text_field(form, request, "split")
        if split is not None and split not in ("train", "val", "test"):
            raise HTTPException(422, f"split must be train, val or test, got {split!r}")
        model = await pool.get(_text_field(form, request, "model"))
        request.state.model = model.name
        compare_ref = _text_field(form, request, "compare_with")
        other = await pool.get(compare_ref) if compare_ref else None

        with tempfile.TemporaryDirectory(prefix="tuneserve-eval-") as scratch:
            if dataset is not None:
                upload = _upload(dataset, "dataset")
                archive = Path(scratch) / "dataset.zip"

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
                root = await asyncio.to_thread(safe_extract_zip, archive, Path(scratch) / "data", limits)
            else:
                root = inside_root(settings.data_root, data_path)

            decode_limits = {"max_pixels": settings.max_pixels, "allowed_formats": settings.allowed_formats}

            def run() -> dict[str, Any]:
                samples = load_samples(root)
                if split:
                    samples = [s for s in samples if s.split == split]
                    if not samples:
                        raise DatasetError(f"no samples in split {split!r}")
                if other is not None:
                    return evaluate_compare(model, other, samples, top_k, **decode_limits)
                return evaluate(model, samples, top_k, **decode_limits)

            report = await asyncio.to_thread(run)
        report["unreadable"] = {
            str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else p: e
            for p, e in (report.get("unreadable") or {}).items()
        }
        _count("evaluate", model.name, "ok")
        return report

    # ---- models ----------------------------------------------------------------------------
    @app.get("/models", dependencies=read, tags=["models"])
    async def list_models(request: Request) -> dict[str, Any]:
        pool = pool_of(request)

        def gather() -> dict[str, Any]:
            out = {}
            for name, versions in store.list_models().items():
                entries = []
                for version in versions:
                    try:
                        entries.append(store.describe(version))
                    except TuneserveError as error:
                        entries.append({"version": version.version, "error": str(error)})
                out[name] = {"latest": store.latest_version(name), "versions": entries}
            return out

        return {
            "default_model": settings.default_model,
            "models": await asyncio.to_thread(gather),
            "loaded": pool.loaded(),
            "runtime": pool.runtime(),
        }

    @app.get("/models/{name}", dependencies=read, tags=["models"])
    async def show_model(name: str, request: Request) -> dict[str, Any]:
        pool = pool_of(request)
        model_name, version = store.split_ref(name)

        def gather() -> dict[str, Any]:
            known = store.list_models()
            if model_name not in known:
                raise store.ModelNotFound(f"unknown model {model_name!r}; known models: {sorted(known) or 'none'}")
            versions = known[model_name]
            if version != "latest":
                versions = [store.resolve(f"{model_name}:{version}")]
            return {
                "name": model_name,
                "latest": store.latest_version(model_name),
                "versions": [store.describe(v, full=True) for v in versions],
            }

        found = await asyncio.to_thread(gather)
        found["loaded"] = {tag: d for tag, d in pool.loaded().items() if tag.split(":")[0] == model_name}
        return found

    @app.post("/models/{name}/reload", dependencies=write, tags=["models"])
    async def reload_model(name: str, request: Request) -> dict[str, Any]:
        """Check the store now instead of waiting for the poller (this worker); loads the model if needed."""
        pool = pool_of(request)
        model_name, _ = store.split_ref(name)
        await pool.get(model_name)
        swapped = await pool.check_for_updates()
        current = await pool.get(model_name)
        return {"model": model_name, "version": current.version, "swapped": swapped}

    return app


def mount_jobs(app: FastAPI, settings: Settings):
    """Fine-tune jobs (service/finetune, another area): returns the JobManager, or None if absent."""
    try:
        from service.finetune import JobManager, build_router
    except ImportError as error:
        level = logging.INFO if (error.name or "").startswith("service.finetune") else logging.WARNING
        log.log(level, "fine-tune jobs unavailable (service.finetune not importable: %s)", error)
        return None
    from service.finetune.api import unavailable_router
    from service.finetune.backends import unavailable_reason

    reason = unavailable_reason(settings.job_backend)
    if reason:
        log.warning("fine-tune jobs unavailable: %s", reason)
        app.include_router(unavailable_router(reason))
        return None
    manager = JobManager(settings)
    app.include_router(build_router(manager, settings))
    return manager
