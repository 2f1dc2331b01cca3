"""What every route shares: the worker's pool, multipart form routes, field types, documented errors.

Upload routes declare their fields (FastAPI `File`/`Form`), so `/api/openapi.json` shows each field
with its type and constraints and FastAPI validates them; `FormRoute` adds what FastAPI leaves out:
415 for a body that is not a form, and parse errors that say what was wrong (413 for too many
files). The body size limit is enforced before any of this, while the body streams in
(service/limits.py `BodyLimitMiddleware`), so a declared upload never gets past the limit.
"""
from __future__ import annotations

import errno
import inspect
import typing
from typing import Annotated, Any, Awaitable, Callable

from fastapi import Form, HTTPException, Path, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.artifact import store
from models.errors import TuneserveError
from service.config import Settings
from service.dataplane import DataPlane
from service.pool import ModelPool
from service.schemas import Error

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
NAME = store.NAME_PATTERN.pattern.removeprefix("^").removesuffix("$")  # models/artifact/store.py's rule for names and versions
MODEL_REF = f"^{NAME}(:{NAME})?$"
MODEL_REF_HELP = "A stored model: `name` (its latest version) or `name:version`; lowercase letters, digits, `-`, `_`, `.`"
NO_NUL = r"^[^\x00]+$"

# What each status means on these routes; `errors(...)` documents a route's statuses with the Error schema.
STATUS_MEANING = {
    400: "The request cannot be used: a file is not an image or a zip, a field is missing or both of two were sent, or the body is not a valid form",
    401: "An API key is needed (Authorization: Bearer <key>) or it is wrong",
    403: "A data path outside the data root",
    404: "An unknown model, version, job or data path",
    409: "The job is in a state that does not allow this",
    413: "The body, an image's pixel count or the number of files is over its limit",
    415: "The body is not multipart/form-data, or an image format is not allowed",
    422: "A field breaks its declared constraints, or the data is not usable (labels, zip contents, training config)",
    429: "Too many active jobs for this key or for the server, or an evaluation already runs in this worker; Retry-After says when to try again",
    503: "The worker is still starting (models are not loaded yet), or it is overloaded; Retry-After says when to try again",
    507: "The fine-tune disk budget or the disk is full",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for `statuses`, each an `Error`."""
    return {status: {"model": Error, "description": STATUS_MEANING[status]} for status in statuses}


UPLOAD_ERRORS = errors(400, 401, 404, 413, 415, 422, 503)


def error_response(error: TuneserveError) -> JSONResponse:
    """`{"error": ...}` with the error's status (and headers, e.g. Retry-After)."""
    return JSONResponse({"error": str(error)}, status_code=error.status, headers=getattr(error, "headers", None))


def pool_of(request: Request) -> ModelPool:
    pool = getattr(request.app.state, "pool", None)
    if pool is None:
        raise HTTPException(503, "the service is starting; models are not loaded yet")
    return pool


async def plane_of(request: Request) -> DataPlane:
    """The worker's data plane over its pool (made here when a test sets only `app.state.pool`).
    Async so FastAPI calls it in the event loop, not through its thread pool (a hop per request)."""
    state, pool = request.app.state, pool_of(request)
    plane = getattr(state, "dataplane", None)
    if plane is None or plane.pool is not pool:
        plane = state.dataplane = DataPlane(pool, state.settings)
    return plane


Receive = Callable[[], Awaitable[dict]]
# Runs before the body is read (auth, quotas); may return a `receive` that limits the body further.
BeforeBody = Callable[[Request], Awaitable[Receive | None]]


class FormRoute(APIRoute):
    """A route whose body is a form: 415, and the `before_body` checks, before a byte of it is read;
    parse errors that say what was wrong."""

    before_body: tuple[BeforeBody, ...] = ()

    def get_route_handler(self) -> Callable:
        parse_and_call = super().get_route_handler()
        if self.body_field is None:  # no body declared (GET, cancel, …): nothing to check
            return parse_and_call

        async def handler(request: Request):
            try:
                for check in self.before_body:
                    receive = await check(request)
                    if receive is not None:
                        request = Request(request.scope, receive)  # same scope, so the same request.state
                content_type = request.headers.get("content-type", "")
                if not content_type.startswith(FORM_TYPES):
                    raise HTTPException(415, f"expected multipart/form-data, got {content_type or 'no content type'}")
                await self._check_fields(request)
            except TuneserveError as error:  # answered here: the router may be used without service/app.py
                return error_response(error)
            return await parse_and_call(request)  # FastAPI validates the (cached) form against the declaration

        return handler

    async def _check_fields(self, request: Request) -> None:
        """Parse the form (Starlette caches it for FastAPI) and refuse fields the route does not declare
        (FastAPI would ignore them) or sends twice (FastAPI would keep one). A field sent empty means
        absent (Swagger UI sends every field), and the schema says so."""
        try:
            form = await request.form(**self.form_limits)
        except StarletteHTTPException as error:
            raise _named_parse_error(error) from None
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):  # spooling the upload to a temporary file
                raise HTTPException(507, f"no space left to receive this upload ({error.strerror})") from None
            raise
        body = self.body_field.field_info.annotation  # FastAPI's model of every form field, sub-dependencies' too
        declared = {field.alias or name for name, field in body.model_fields.items()}
        unknown = sorted({key for key, value in form.multi_items() if not _empty_file_input(value)} - declared)
        if unknown:
            raise HTTPException(422, f"unknown form fields {unknown}; this route takes {sorted(declared)}")
        lists = {field.alias or name for name, field in body.model_fields.items() if _is_list(field.annotation)}
        repeated = sorted({key for key in form.keys() if key not in lists and len(form.getlist(key)) > 1})
        if repeated:
            raise HTTPException(422, f"form fields {repeated} were sent more than once; each takes one value")


def form_route(*checks: BeforeBody) -> type[FormRoute]:
    """A FormRoute class that runs `checks` before reading the body."""
    return type("FormRoute", (FormRoute,), {"before_body": checks})


def before_body(dependency: Callable[..., Any]) -> BeforeBody:
    """An auth dependency (service/auth.py) run as a `before_body` check, so a caller without a key
    is refused before uploading anything; it stays declared on the route too (OpenAPI security)."""

    async def check(request: Request) -> None:
        call_auth(dependency, request)
        return None

    return check


def call_auth(dependency: Callable[..., Any], request: Request) -> Any:
    """Run an auth dependency from service/auth.py directly: its parameters after the request (the
    declared Bearer credentials) are only there for OpenAPI, so they get None."""
    extra = len(inspect.signature(dependency).parameters) - 1
    return dependency(request, *([None] * extra))


def _is_list(annotation: Any) -> bool:
    """list[...] or list[...] | None."""
    if typing.get_origin(annotation) is list:
        return True
    return any(typing.get_origin(arg) is list for arg in typing.get_args(annotation))


def _empty_file_input(value: Any) -> bool:
    """What a browser sends for a file input left empty; FastAPI reads it as absent, and so do we."""
    return isinstance(value, StarletteUploadFile) and not value.filename and not value.size


def _named_parse_error(error: StarletteHTTPException) -> StarletteHTTPException:
    """Starlette answers every multipart parse error with 400; too many files is a size limit (413)."""
    if error.status_code == 400 and "Too many files" in str(error.detail):
        return HTTPException(413, f"too many files in one request: {error.detail}")
    if error.status_code == 400:
        return HTTPException(400, f"cannot parse the multipart body: {error.detail}")
    return error


MIN_CONFIDENCE_SCHEMA = {
    "anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "string", "enum": ["auto"]}],
    "description": "Abstain (label null) below this probability: a number in [0, 1], or `auto` for the "
    "version's per-label thresholds (422 for a version exported without them)",
}


def min_confidence_field():
    """A text field checked by service/dataplane.py `min_confidence_of`; its schema is MIN_CONFIDENCE_SCHEMA (`form_part`)."""
    return Annotated[str | None, Form()]


def model_field(description: str = MODEL_REF_HELP):
    """An optional form field naming a stored model (the default model when absent)."""
    return Annotated[str | None, Form(pattern=MODEL_REF, max_length=129, description=description)]


def top_k_field(settings: Settings):
    return Annotated[
        int,
        Form(ge=1, le=settings.max_top_k, description=f"How many labels to return, most probable first (1..{settings.max_top_k})"),
    ]


ModelPath = Annotated[str, Path(pattern=MODEL_REF, max_length=129, description=MODEL_REF_HELP)]


# ---- OpenAPI rules FastAPI cannot derive from parameters -------------------------------------
ONE_OF_KEY = "x-exactly-one-of"
FORM_PART_KEY = "x-form-parts"


def exactly_one_of(*fields: str) -> dict[str, Any]:
    """`openapi_extra` for a form that needs exactly one of `fields` (see `apply_form_rules`)."""
    return {ONE_OF_KEY: list(fields)}


def json_form_part(field: str, schema: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` for a text form field that carries JSON with `schema` (sent as application/json)."""
    return {FORM_PART_KEY: {field: {"schema": schema, "contentType": "application/json"}}}


def file_form_part(field: str, media_type: str, description: str) -> dict[str, Any]:
    """`openapi_extra` for a file field that must hold a `media_type` file (a zip): its part is sent
    with that content type, and the schema says so (`contentMediaType`)."""
    schema = {"type": "string", "format": "binary", "contentMediaType": media_type, "description": description}
    return {FORM_PART_KEY: {field: {"schema": schema, "contentType": media_type}}}


def form_rules(*rules: dict[str, Any]) -> dict[str, Any]:
    """Several `openapi_extra` rules of this module as one (their form parts merged)."""
    merged: dict[str, Any] = {}
    for rule in rules:
        for key, value in rule.items():
            merged[key] = {**merged.get(key, {}), **value} if key == FORM_PART_KEY else value
    return merged


def form_part(field: str, schema: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` giving a text form field a schema FastAPI cannot derive from its annotation."""
    return {FORM_PART_KEY: {field: {"schema": schema}}}


def apply_form_rules(openapi: dict[str, Any]) -> dict[str, Any]:
    """Form bodies as a client can send them: rules kept in `openapi_extra` moved into the body
    schemas they constrain, and no `null` alternatives (a form field is either sent or absent)."""
    components = openapi.get("components", {}).get("schemas", {})
    for path_item in openapi.get("paths", {}).values():
        for operation in path_item.values():
            one_of = operation.pop(ONE_OF_KEY, None)
            parts = operation.pop(FORM_PART_KEY, None)
            media = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
            if media is None:
                continue
            operation["requestBody"]["required"] = True  # a form route always needs its form
            body = components[media["schema"]["$ref"].rsplit("/", 1)[-1]]
            body["additionalProperties"] = False  # FormRoute refuses undeclared fields
            required = set(body.get("required", ()))
            for name, field in body["properties"].items():
                field = _as_file_input(_without_null(field))
                body["properties"][name] = field if name in required else _empty_means_default(field)
            if one_of:
                body["oneOf"] = exactly_one_schema(body["properties"], one_of)
            for field, part in (parts or {}).items():
                body["properties"][field] = part["schema"]
                if "contentType" in part:
                    media.setdefault("encoding", {})[field] = {"contentType": part["contentType"]}
    return openapi


def exactly_one_schema(properties: dict[str, Any], fields: list[str]) -> list[dict[str, Any]]:
    """`oneOf` branches for "exactly one of `fields`", as the server counts them: a text field sent
    empty is absent (FastAPI reads "" as absent), so each branch has its field present (non-empty
    text) and every other one absent (not sent, or empty text)."""
    def is_file(name: str) -> bool:
        field = properties[name]
        return field.get("format") == "binary" or "contentMediaType" in field

    branches = []
    for chosen in fields:
        rules: dict[str, Any] = {chosen: {} if is_file(chosen) else {"minLength": 1}}
        for other in fields:
            if other != chosen:
                rules[other] = False if is_file(other) else {"maxLength": 0}
        branches.append({"required": [chosen], "properties": rules})
    return branches


def _empty_means_default(field: dict[str, Any]) -> dict[str, Any]:
    """An optional text field also takes "": FastAPI reads an empty form field as absent."""
    if field.get("format") == "binary" or field.get("type") == "array":
        return field
    described = {key: field.pop(key) for key in ("title", "description", "default") if key in field}
    return {"anyOf": [field, {"type": "string", "maxLength": 0}], **described}


def _as_file_input(field: dict[str, Any]) -> dict[str, Any]:
    """A file field also says `format: binary`, which is what Swagger UI turns into a file chooser."""
    target = field.get("items", field)
    if "contentMediaType" in target:
        target["format"] = "binary"
    return field


def _without_null(field: dict[str, Any]) -> dict[str, Any]:
    choices = [choice for choice in field.get("anyOf", ()) if choice.get("type") != "null"]
    if len(choices) != 1:
        return field
    merged = {key: value for key, value in field.items() if key != "anyOf"}
    return {**choices[0], **merged}
