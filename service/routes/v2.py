"""The Open Inference Protocol (KServe V2) over REST, so Triton/KServe/MLServer clients work unchanged.

GET  /v2                                     server metadata and the extensions supported
GET  /v2/health/live, /v2/health/ready       liveness; readiness (the default model is loaded)
GET  /v2/models/{m}[/versions/{v}]           model metadata: inputs, outputs, datatypes, shapes, versions
GET  /v2/models/{m}[/versions/{v}]/ready     the model loads and answers
POST /v2/models/{m}[/versions/{v}]/infer     inference

Tensors and outputs are service/oip/core.py's (shared with gRPC), the JSON and binary encodings
service/oip/rest.py's, the inference the data plane's. Same model routing, batching, limits and API
key as /classify; errors are `{"error": "..."}` with the status of the problem.
"""
import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from fastapi.responses import Response

from models.artifact import store
from models.errors import TuneserveError
from service.auth import require_read_access
from service.config import Settings
from service.dataplane import DataPlane
from service.oip import core
from service.oip.rest import (
    HEADER_LENGTH, InferRequest, InferResponse, Live, ModelMetadata, ModelReady, Ready, ServerMetadata, encode_response, parse_request,
)
from service.pool import count_request
from service.routes.forms import MODEL_REF, errors, plane_of

NAME = MODEL_REF.removeprefix("^").split("(:")[0]  # one name or version (models/artifact/store.py's rule)
ModelName = Annotated[str, Path(pattern=f"^{NAME}$", max_length=64, description="A stored model's name")]
Version = Annotated[str, Path(pattern=f"^{NAME}$", max_length=64, description="One of its versions")]
Plane = Annotated[DataPlane, Depends(plane_of)]


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with its local `$defs` references replaced by the definitions (for openapi_extra)."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


BINARY_ANSWER = {200: {"content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"},
    "description": "With binary outputs asked for: the JSON answer (Inference-Header-Content-Length bytes), then the outputs' bytes",
}}}}
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inlined(InferRequest.model_json_schema())},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "The binary tensor data extension: the JSON request (Inference-Header-Content-Length "
                "bytes), then the tensors' bytes",
            },
        },
    }
}


# ---- the router --------------------------------------------------------------------------------
def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"], dependencies=[Depends(require_read_access(settings))])

    @router.get("", response_model=ServerMetadata, responses=errors(401))
    async def server_metadata() -> ServerMetadata:
        return ServerMetadata(name=core.SERVER_NAME, version=core.server_version(), extensions=core.EXTENSIONS)

    @router.get("/health/live", response_model=Live, responses=errors(401))
    async def live() -> Live:
        return Live(live=True)

    @router.get("/health/ready", response_model=Ready, responses=errors(401, 503))
    async def ready(plane: Plane) -> Ready:
        if not plane.pool.ready():
            raise HTTPException(503, "not ready: the default model is still loading")
        return Ready(ready=True)

    async def metadata(plane: DataPlane, name: str, version: str | None) -> ModelMetadata:
        classifier = await plane.resolve(_ref(name, version))
        versions = [v.version for v in await asyncio.to_thread(lambda: store.list_models().get(name, []))]
        return ModelMetadata(**core.model_metadata(classifier, versions))

    async def model_ready(plane: DataPlane, name: str, version: str | None) -> ModelReady:
        await plane.resolve(_ref(name, version))
        return ModelReady(name=name, ready=True)

    async def infer(request: Request, plane: DataPlane, name: str, version: str | None) -> Response:
        classifier = await plane.resolve(_ref(name, version))
        request.state.model = classifier.name
        try:
            inference, binary_default = parse_request(await request.body(), request.headers.get(HEADER_LENGTH))
            result, outputs = await core.infer(plane, classifier, inference, settings.max_batch)
        except TuneserveError:
            count_request("v2_infer", classifier.name, "refused")
            raise
        count_request("v2_infer", classifier.name, "ok")
        return encode_response(result.model, result.version, result.id, outputs, binary_default, result.request_ids)

    metadata_errors, infer_errors = errors(401, 404, 422, 503), {**errors(400, 401, 404, 413, 415, 422, 503), **BINARY_ANSWER}
    for prefix in ("/models/{name}", "/models/{name}/versions/{version}"):
        with_version = "{version}" in prefix
        router.add_api_route(prefix, _bind(metadata, with_version), methods=["GET"], response_model=ModelMetadata,
                             responses=metadata_errors, name=f"model_metadata{'_version' if with_version else ''}")
        router.add_api_route(f"{prefix}/ready", _bind(model_ready, with_version), methods=["GET"],
                             response_model=ModelReady, responses=metadata_errors,
                             name=f"model_ready{'_version' if with_version else ''}")
        router.add_api_route(f"{prefix}/infer", _bind(infer, with_version, needs_request=True), methods=["POST"],
                             response_model=InferResponse, responses=infer_errors, openapi_extra=INFER_BODY,
                             name=f"model_infer{'_version' if with_version else ''}")
    return router


def _bind(handler, with_version: bool, needs_request: bool = False):
    """An endpoint for `handler` on the path with or without `/versions/{version}`."""
    if with_version and needs_request:
        async def endpoint(request: Request, plane: Plane, name: ModelName, version: Version):
            return await handler(request, plane, name, version)
    elif needs_request:
        async def endpoint(request: Request, plane: Plane, name: ModelName):
            return await handler(request, plane, name, None)
    elif with_version:
        async def endpoint(plane: Plane, name: ModelName, version: Version):
            return await handler(plane, name, version)
    else:
        async def endpoint(plane: Plane, name: ModelName):
            return await handler(plane, name, None)
    endpoint.__doc__ = handler.__doc__
    return endpoint


def _ref(name: str, version: str | None) -> str:
    return f"{name}:{version}" if version else name
