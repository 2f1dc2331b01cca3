"""The FastAPI app (mounted into the BentoML service by service/service.py): routers from
service/routes/, one per area, and the error handlers that turn every refusal into a 4xx with
`{"error": "..."}` naming the problem (`models.errors.*.status` gives the status).

Uploads are taken as multipart files and decoded by our code (never as PIL parameters, which 500
on corrupt input, nor as file parameters, which fetch URLs).
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from models.errors import TuneserveError, is_disk_full
from service.config import Settings
from service.pool import count_request
from service.loop.plane import ClientIdMiddleware
from service.routes import classify, evaluate, loop, models, v2
from service.openapi import complete
from service.routes.forms import apply_form_rules

log = logging.getLogger("tuneserve.service")

# BentoML serves its bundled Swagger UI (OpenAPI 3.1 capable) at /static_content on the same server.
SWAGGER_ASSETS = {
    "swagger_js_url": "/static_content/swagger-ui-bundle.js",
    "swagger_css_url": "/static_content/swagger-ui.css",
    "swagger_favicon_url": "/static_content/favicon-light-32x32.png",
}
COUNTED_ROUTES = ("classify", "classify_batch", "evaluate")


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="tuneserve",
        description="Classify images with fine-tuned models; evaluate them; fine-tune new ones.",
        docs_url=None,  # served below, with the Swagger UI that BentoML ships (no CDN: works offline)
        openapi_url="/api/openapi.json",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.pool = None  # set by each BentoML worker (service/service.py)
    add_error_handlers(app)
    for area in (classify, evaluate, models, v2, loop):
        app.include_router(area.build_router(settings))
    app.add_middleware(ClientIdMiddleware)  # X-Client-Id: sticky canary routing (service/loop)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = complete(apply_form_rules(document), app.routes, job_kinds())
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/api/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/api/openapi.json", title="tuneserve API", **SWAGGER_ASSETS)

    return app


def job_kinds() -> tuple[str, ...]:
    """The job kinds whose routes may be mounted (their URL prefixes), for the OpenAPI links."""
    try:
        from service.jobs.registry import KINDS
    except ImportError:  # a serve-only build without the job system
        return ()
    return tuple(KINDS)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _count_refusal(request: Request) -> None:
    route = request.url.path.strip("/")
    if route in COUNTED_ROUTES:
        count_request(route, getattr(request.state, "model", None) or "-", "refused")


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TuneserveError)
    async def _tuneserve_error(request: Request, error: TuneserveError):
        _count_refusal(request)
        response = _error(error.status, str(error))
        response.headers.update(getattr(error, "headers", None) or {})  # e.g. Retry-After on a 429
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        if error.status_code < 500:
            _count_refusal(request)
        headers = dict(error.headers or {})
        if error.status_code == 405:  # Starlette names the methods of the first route only
            headers["Allow"] = ", ".join(sorted(allowed_methods(app, request.url.path)))
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        _count_refusal(request)
        return _error(422, "; ".join(_explain(e) for e in error.errors()) or "invalid request")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception):
        if is_disk_full(error):  # e.g. the job database on a full disk: nothing was changed
            log.error("disk full: %s", error)
            return _error(507, "the server's disk is full; nothing was changed, try again once space is freed")  # the path stays in the log
        log.exception("unexpected error")
        return _error(500, f"internal error: {type(error).__name__}")


def _explain(problem: dict[str, Any]) -> str:
    """One validation problem in words, naming the field ('image', 'top_k', …)."""
    where = ".".join(str(p) for p in problem.get("loc", ()) if p not in ("body", "query", "path"))
    if problem.get("type") == "missing":
        return f"missing '{where}'"
    if "UploadFile" in str(problem.get("msg", "")):
        return f"'{where}' must be an uploaded file (a multipart file part); text and URLs are not accepted"
    return f"{where}: {problem.get('msg')}"


def allowed_methods(app: FastAPI, path: str) -> set[str]:
    """Every method the API declares for `path` (for the Allow header of a 405)."""
    methods: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        if compile_path(template)[0].match(path):
            methods |= {method.upper() for method in operations}
    if "GET" in methods:
        methods.add("HEAD")
    return methods


def mount_jobs(app: FastAPI, settings: Settings):
    """Jobs of every kind (service/jobs/registry.py) on one runner: returns the JobManager, or None
    when jobs cannot run here (then every job route answers 501 saying why)."""
    try:
        from service.finetune import JobManager
        from service.jobs.registry import KINDS
        from service.jobs.router import build_router, unavailable_router
    except ImportError as error:
        level = logging.INFO if (error.name or "").startswith(("service.finetune", "service.jobs")) else logging.WARNING
        log.log(level, "jobs unavailable (service.jobs not importable: %s)", error)
        return None
    from service.finetune.backends import unavailable_reason

    reason = unavailable_reason(settings.job_backend)
    if reason:
        log.warning("jobs unavailable: %s", reason)
        app.include_router(unavailable_router(reason, tuple(f"/{name}" for name in KINDS)))
        return None
    manager = JobManager(settings)
    for kind in KINDS.values():  # one job store and runner for every kind
        app.include_router(build_router(kind, manager, settings))
    return manager
