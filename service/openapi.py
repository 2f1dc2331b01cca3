"""The OpenAPI document as the server behaves, beyond what FastAPI derives from the routes:

- error statuses with the media types they are answered in (JSON, also where a success is text; a
  404 for a path no route takes is BentoML's, in plain text);
- security as enforced: a route whose key check is off by configuration (reads, unless
  TUNESERVE_PROTECT_READS; every route with TUNESERVE_AUTH=off) declares the key optional
  (`[{}, {HTTPBearer: []}]`), the others required;
- links from the operations that answer an id to those that take it (a submitted job → its
  status, log, cancel, resume, delete; the model list → a model → its versions), so a client or a
  stateful fuzzer can follow them.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts

BEARER = "HTTPBearer"
JOB_OPERATIONS = {  # link name → (method, path under /{kind}/{job_id}, what it does)
    "status": ("get", "", "The job's state and progress"), "log": ("get", "/log", "The tail of the job's log"),
    "cancel": ("post", "/cancel", "Stop the job"), "resume": ("post", "/resume", "Requeue the job once it ended"),
    "delete": ("delete", "", "Forget the job once it ended"),
}
ERROR_MEDIA_TYPE = "application/json"  # every refusal is {"error": ...} (service/app.py's handlers)
UNROUTED_MEDIA_TYPE = "text/plain"


def complete(openapi: dict[str, Any], routes: Iterable[Any], job_kinds: Iterable[str]) -> dict[str, Any]:
    declare_security(openapi, routes)
    declare_error_media(openapi)
    for kind in job_kinds:
        link_job_kind(openapi, kind)
    link_models(openapi)
    return openapi


# -- security ----------------------------------------------------------------------------------
def declare_security(openapi: dict[str, Any], routes: Iterable[Any]) -> None:
    """Each operation's `security` as its key check enforces it (service/auth.py `key_required`)."""
    for route in iter_route_contexts(list(routes)):  # included routers' routes too, with their dependencies
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        marks = [call.key_required for call in _calls(route.dependant) if hasattr(call, "key_required")]
        if not marks:
            continue
        security = [{BEARER: []}] if any(marks) else [{}, {BEARER: []}]
        for method in route.methods:
            operation = openapi["paths"].get(route.path_format, {}).get(method.lower())
            if operation is not None:
                operation["security"] = security


def _calls(dependant: Dependant) -> Iterator[Any]:
    for dependency in dependant.dependencies:
        if dependency.call is not None:
            yield dependency.call
        yield from _calls(dependency)


def declare_error_media(openapi: dict[str, Any]) -> None:
    """Error statuses answer JSON even where the success is text (a job's log): FastAPI gives every
    declared response the route's media type, so the error ones are set back to JSON here."""
    for path, path_item in openapi.get("paths", {}).items():
        for operation in path_item.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content")
                if status[:1] in "45" and content and ERROR_MEDIA_TYPE not in content:
                    response["content"] = content = {ERROR_MEDIA_TYPE: next(iter(content.values()))}
                if status == "404" and content and "{" in path:
                    # a path segment with a line break is routed by no route of this app: BentoML's
                    # own mount answers that 404, in plain text
                    content[UNROUTED_MEDIA_TYPE] = {"schema": {"type": "string"}}


# -- links -------------------------------------------------------------------------------------
def link(openapi: dict[str, Any], source: tuple[str, str, str], name: str, target: tuple[str, str],
         parameters: dict[str, str], description: str) -> None:
    """A link on `source` (method, path, status) to `target` (method, path), when both are served."""
    method, path, status = source
    response = openapi["paths"].get(path, {}).get(method, {}).get("responses", {}).get(status)
    operation = openapi["paths"].get(target[1], {}).get(target[0])
    if response is None or operation is None:
        return
    response.setdefault("links", {})[name] = {
        "operationId": operation["operationId"], "parameters": parameters, "description": description,
    }


def link_job_kind(openapi: dict[str, Any], kind: str) -> None:
    """A submitted job's id → every operation on it."""
    one = f"/{kind}/{{job_id}}"
    for name, (method, tail, description) in JOB_OPERATIONS.items():
        link(openapi, ("post", f"/{kind}", "202"), name, (method, one + tail), {"job_id": "$response.body#/job_id"},
             description)


def link_models(openapi: dict[str, Any]) -> None:
    """The default model → its detail, reload and protocol metadata; a model → its newest listed version."""
    default = {"name": "$response.body#/default_model"}
    for name, target in (("detail", ("get", "/models/{name}")), ("reload", ("post", "/models/{name}/reload")),
                         ("metadata", ("get", "/v2/models/{name}")), ("ready", ("get", "/v2/models/{name}/ready"))):
        link(openapi, ("get", "/models", "200"), name, target, default, "The default model")
    version = {"name": "$response.body#/name", "version": "$response.body#/versions/0/version"}
    for name, target in (("version_metadata", ("get", "/v2/models/{name}/versions/{version}")),
                         ("version_ready", ("get", "/v2/models/{name}/versions/{version}/ready"))):
        link(openapi, ("get", "/models/{name}", "200"), name, target, version, "The first version listed")
