"""The Open Inference Protocol (KServe V2 REST), so Triton/KServe/MLServer clients work unchanged.

GET  /v2                                     server metadata and the extensions supported
GET  /v2/health/live, /v2/health/ready       liveness; readiness (the default model is loaded)
GET  /v2/models/{m}[/versions/{v}]           model metadata: inputs, outputs, datatypes, shapes, versions
GET  /v2/models/{m}[/versions/{v}]/ready     the model loads and answers
POST /v2/models/{m}[/versions/{v}]/infer     inference

One input tensor per request: `BYTES [N]`, one encoded image (JPEG, PNG, …) per element, decoded by
models/preprocess.py like /classify; or `UINT8 [N, S, S, 3]` already at the manifest's size S.
Outputs: `probabilities` and `logits`, FP32 `[N, C]`; with the classification extension
(`"parameters": {"classification": k}` on a requested output) BYTES `[N, k]` of "prob:index:label".
The binary tensor data extension is read (`Inference-Header-Content-Length`, BYTES elements as
4-byte little-endian length + bytes), because tritonclient.http sends inputs that way; responses are
JSON. Same model routing, batching, limits and API key as /classify; errors are `{"error": "..."}`.
"""
import asyncio
import math
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Path, Request
from pydantic import BaseModel, Field, ValidationError

from models import store
from models.decision import MinConfidence, check_supported, parse_min_confidence
from models.errors import ImageError, TuneserveError
from models.preprocess import stack
from models.runtime import OnnxClassifier
from service.auth import require_read_access
from service.config import Settings
from service.pool import ModelPool, count_request
from service.pool.registry import prediction_of
from service.routes.forms import _NAME, errors, pool_of

EXTENSIONS = ["classification", "binary_tensor_data"]
HEADER_LENGTH = "inference-header-content-length"
OUTPUTS = ("probabilities", "logits")

ModelName = Annotated[str, Path(pattern=f"^{_NAME}$", max_length=64, description="A stored model's name")]
Version = Annotated[str, Path(pattern=f"^{_NAME}$", max_length=64, description="One of its versions")]
Pool = Annotated[ModelPool, Depends(pool_of)]


# ---- the protocol's messages -----------------------------------------------------------------
class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str = "onnxruntime_onnx"
    inputs: list[TensorMetadata] = Field(description="Send exactly one of these: encoded images, or pixels at the model's size")
    outputs: list[TensorMetadata]


class InferInput(BaseModel):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: Literal["BYTES", "UINT8"]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(None, description="UINT8 values (flat or nested); BYTES need the binary extension")


class RequestedOutput(BaseModel):
    name: Literal["probabilities", "logits"]
    parameters: dict[str, Any] | None = Field(None, description='{"classification": k} for the top k as "prob:index:label"')


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description='{"min_confidence": 0.5 | "auto"} adds the outputs label, abstained and in_domain')
    inputs: list[InferInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestedOutput] | None = None


class InferOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any]


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]


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


class ProtocolError(TuneserveError):
    """A request the protocol or the model cannot take (400 unless said otherwise)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---- the router --------------------------------------------------------------------------------
def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"], dependencies=[Depends(require_read_access(settings))])

    @router.get("", response_model=ServerMetadata, responses=errors(401))
    async def server_metadata() -> ServerMetadata:
        from importlib.metadata import PackageNotFoundError, version

        try:
            own = version("tuneserve")
        except PackageNotFoundError:
            own = "unknown"
        return ServerMetadata(name="tuneserve", version=own, extensions=EXTENSIONS)

    @router.get("/health/live", response_model=Live, responses=errors(401))
    async def live() -> Live:
        return Live(live=True)

    @router.get("/health/ready", response_model=Ready, responses=errors(401, 503))
    async def ready(pool: Pool) -> Ready:
        if not pool.ready():
            raise HTTPException(503, "not ready: the default model is still loading")
        return Ready(ready=True)

    async def metadata(pool: ModelPool, name: str, version: str | None) -> ModelMetadata:
        classifier = await pool.get(_ref(name, version))
        versions = [v.version for v in await asyncio.to_thread(lambda: store.list_models().get(name, []))]
        return describe(classifier, versions)

    async def model_ready(pool: ModelPool, name: str, version: str | None) -> ModelReady:
        await pool.get(_ref(name, version))
        return ModelReady(name=name, ready=True)

    async def infer(request: Request, pool: ModelPool, name: str, version: str | None) -> InferResponse:
        classifier = await pool.get(_ref(name, version))
        request.state.model = classifier.name
        try:
            response = await run_inference(request, pool, classifier, settings)
        except TuneserveError:
            count_request("v2_infer", classifier.name, "refused")
            raise
        count_request("v2_infer", classifier.name, "ok")
        return response

    metadata_errors, infer_errors = errors(401, 404, 422, 503), errors(400, 401, 404, 413, 415, 422, 503)
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
        async def endpoint(request: Request, pool: Pool, name: ModelName, version: Version):
            return await handler(request, pool, name, version)
    elif needs_request:
        async def endpoint(request: Request, pool: Pool, name: ModelName):
            return await handler(request, pool, name, None)
    elif with_version:
        async def endpoint(pool: Pool, name: ModelName, version: Version):
            return await handler(pool, name, version)
    else:
        async def endpoint(pool: Pool, name: ModelName):
            return await handler(pool, name, None)
    endpoint.__doc__ = handler.__doc__
    return endpoint


def _ref(name: str, version: str | None) -> str:
    return f"{name}:{version}" if version else name


def describe(classifier: OnnxClassifier, versions: list[str]) -> ModelMetadata:
    size = classifier.manifest.preprocessing.size
    classes = classifier.manifest.num_classes
    return ModelMetadata(
        name=classifier.name,
        versions=versions,
        inputs=[
            TensorMetadata(name="image", datatype="BYTES", shape=[-1]),
            TensorMetadata(name="pixels", datatype="UINT8", shape=[-1, size, size, 3]),
        ],
        outputs=[TensorMetadata(name=output, datatype="FP32", shape=[-1, classes]) for output in OUTPUTS],
    )


# ---- inference ---------------------------------------------------------------------------------
async def run_inference(request: Request, pool: ModelPool, classifier: OnnxClassifier, settings: Settings) -> InferResponse:
    infer_request, binary = await read_request(request)
    tensor = infer_request.inputs[0]
    raw = tensor_bytes(tensor, binary)
    if tensor.datatype == "BYTES":
        arrays = await decode_images(pool, classifier, bytes_elements(tensor, raw), settings.max_batch)
    else:
        arrays = pixel_rows(tensor, raw, classifier.manifest.preprocessing.size, settings.max_batch)
    wanted = infer_request.outputs or [RequestedOutput(name=name) for name in OUTPUTS]
    min_confidence = parse_min_confidence((infer_request.parameters or {}).get("min_confidence"))
    check_supported(min_confidence, classifier.manifest, classifier.tag)  # `auto` needs thresholds
    values = await compute(pool, classifier, arrays, {output.name for output in wanted})
    outputs = [output_tensor(output, values[output.name], classifier) for output in wanted]
    if min_confidence is not None:
        outputs += await decision_tensors(pool, classifier, arrays, min_confidence)
    return InferResponse(model_name=classifier.name, model_version=classifier.version, id=infer_request.id, outputs=outputs)


async def decision_tensors(pool: ModelPool, classifier: OnnxClassifier, arrays: list[np.ndarray],
                           min_confidence: MinConfidence) -> list[InferOutput]:
    """With the request parameter `min_confidence` (a number or "auto"), the same decision as
    /classify, as three extra outputs: `label` BYTES [N] ("" where abstained), `abstained` BOOL [N],
    and `in_domain` FP32 [N] for versions that have an in-domain score."""
    scored = await asyncio.gather(*(pool.infer_scored(classifier, array) for array in arrays))
    decided = [prediction_of(classifier, probabilities, 1, min_confidence, in_domain) for probabilities, in_domain in scored]
    count = [len(decided)]
    outputs = [
        InferOutput(name="label", datatype="BYTES", shape=count, data=[d.label or "" for d in decided]),
        InferOutput(name="abstained", datatype="BOOL", shape=count, data=[d.abstained for d in decided]),
    ]
    if all(d.in_domain is not None for d in decided):
        outputs.append(InferOutput(name="in_domain", datatype="FP32", shape=count, data=[float(d.in_domain) for d in decided]))
    return outputs


async def read_request(request: Request) -> tuple[InferRequest, bytes]:
    """The JSON request and the binary tensor data after it (empty without the extension)."""
    body = await request.body()
    declared = request.headers.get(HEADER_LENGTH)
    if declared is None:
        header, binary = body, b""
    else:
        if not declared.isdigit() or int(declared) > len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {declared!r} is not a length within the body ({len(body)} bytes)")
        header, binary = body[: int(declared)], body[int(declared):]
    try:
        return InferRequest.model_validate_json(header), binary
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()[:5])
        raise ProtocolError(f"not an inference request: {problems}") from None


def tensor_bytes(tensor: InferInput, binary: bytes) -> bytes | None:
    """The input's binary data (None when it came as JSON `data`)."""
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        if binary:
            raise ProtocolError(f"binary data follows the request but input {tensor.name!r} has no binary_data_size")
        if tensor.data is None:
            raise ProtocolError(f"input {tensor.name!r} has neither data nor binary_data_size")
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise ProtocolError(f"input {tensor.name!r}: binary_data_size {size!r} does not match the {len(binary)} bytes sent")
    return binary


def _count(shape: list[int]) -> int:
    return math.prod(shape) if shape else 0


def bytes_elements(tensor: InferInput, raw: bytes | None) -> list[bytes]:
    """BYTES elements from the binary extension: each a 4-byte little-endian length, then its bytes."""
    if raw is None:
        raise ProtocolError("BYTES images must be sent with the binary tensor data extension (tritonclient does by default)")
    elements, position = [], 0
    while position < len(raw):
        if position + 4 > len(raw):
            raise ProtocolError(f"input {tensor.name!r}: a BYTES element length is cut off at byte {position}")
        length = int.from_bytes(raw[position: position + 4], "little")
        position += 4
        if position + length > len(raw):
            raise ProtocolError(f"input {tensor.name!r}: element {len(elements)} says {length} bytes; fewer follow")
        elements.append(raw[position: position + length])
        position += length
    if len(elements) != _count(tensor.shape) or not elements:
        raise ProtocolError(f"input {tensor.name!r}: shape {tensor.shape} but {len(elements)} elements were sent")
    return elements


async def decode_images(pool: ModelPool, classifier: OnnxClassifier, images: list[bytes], limit: int) -> list[np.ndarray]:
    if len(images) > limit:
        raise ProtocolError(f"too many images: {len(images)}; limit is {limit} (TUNESERVE_MAX_BATCH)", 413)

    async def one(index: int, data: bytes) -> np.ndarray:
        try:
            return await pool.prepare(data, classifier)
        except ImageError as error:
            raise ProtocolError(f"image {index} of the batch: {error}", error.status) from None

    return list(await asyncio.gather(*(one(i, data) for i, data in enumerate(images))))


def pixel_rows(tensor: InferInput, raw: bytes | None, size: int, limit: int) -> list[np.ndarray]:
    """UINT8 `[N, size, size, 3]` from binary bytes or JSON `data`, one array per image."""
    if len(tensor.shape) != 4 or tuple(tensor.shape[1:]) != (size, size, 3) or tensor.shape[0] < 1:
        raise ProtocolError(f"input {tensor.name!r}: UINT8 images must have shape [N, {size}, {size}, 3], got {tensor.shape}")
    if tensor.shape[0] > limit:
        raise ProtocolError(f"too many images: {tensor.shape[0]}; limit is {limit} (TUNESERVE_MAX_BATCH)", 413)
    if raw is not None:
        if len(raw) != _count(tensor.shape):
            raise ProtocolError(f"input {tensor.name!r}: shape {tensor.shape} needs {_count(tensor.shape)} bytes, got {len(raw)}")
        pixels = np.frombuffer(raw, np.uint8)
    else:
        try:
            values = np.asarray(tensor.data, dtype=np.int64).reshape(-1)
        except (ValueError, TypeError, OverflowError):
            raise ProtocolError(f"input {tensor.name!r}: UINT8 data must be integers 0..255") from None
        if values.size != _count(tensor.shape) or values.size and (values.min() < 0 or values.max() > 255):
            raise ProtocolError(f"input {tensor.name!r}: UINT8 data must be {_count(tensor.shape)} integers 0..255")
        pixels = values.astype(np.uint8)
    return list(pixels.reshape(tensor.shape))


async def compute(pool: ModelPool, classifier: OnnxClassifier, arrays: list[np.ndarray], names: set[str]) -> dict[str, np.ndarray]:
    """Probabilities through the model's micro-batcher; with logits, one direct run for both."""
    if "logits" not in names:
        rows = await asyncio.gather(*(pool.infer(classifier, array) for array in arrays))
        return {"probabilities": np.stack(rows)}
    logits_name, probabilities_name = classifier.manifest.output_names
    logits, probabilities = await asyncio.to_thread(classifier.run, stack(arrays), [logits_name, probabilities_name])
    return {"probabilities": probabilities, "logits": logits}


def output_tensor(requested: RequestedOutput, values: np.ndarray, classifier: OnnxClassifier) -> InferOutput:
    k = (requested.parameters or {}).get("classification")
    if k is None:
        return InferOutput(name=requested.name, datatype="FP32", shape=list(values.shape), data=values.astype(np.float32).ravel().tolist())
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ProtocolError(f"output {requested.name!r}: classification must be a positive integer, got {k!r}")
    k = min(k, values.shape[1])
    labels = classifier.manifest.labels
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    data = [f"{float(values[row, index])}:{index}:{labels[index]}" for row in range(len(values)) for index in order[row]]
    return InferOutput(name=requested.name, datatype="BYTES", shape=[len(values), k], data=data)
