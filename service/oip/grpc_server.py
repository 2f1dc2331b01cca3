"""The OIP over gRPC: `inference.GRPCInferenceService` (grpc_predict_v2.proto) in every worker.

Each BentoML worker starts a grpc.aio server in its own event loop (service/service.py's startup
hook), over the worker's own data plane: the same models, micro-batcher, limits and API keys as
its HTTP routes, and no second copy of a model in memory. The workers share one port
(`TUNESERVE_GRPC_PORT`, default 8001, Triton's; 0 turns gRPC off) with SO_REUSEPORT: every worker
binds it and the kernel spreads new connections over them. BentoML hands its HTTP socket to its
workers from the parent process, which grpc.aio cannot take; a server beside the workers would
need its own copy of every model or a hop to reach them. A gRPC connection stays with the worker
that accepted it, so a single long-lived client uses one worker (open a few channels to use more).

Refusals are gRPC status codes mapped from the HTTP status the same problem gets over REST
(`STATUS_CODES`), with the same message. Messages up to the HTTP body limit are taken
(`TUNESERVE_MAX_BODY_MB`, above gRPC's 4 MB default); a larger one is refused with
RESOURCE_EXHAUSTED before it reaches our code. With TUNESERVE_PROTECT_READS every call needs the
metadata `authorization: Bearer <key>`, as every /v2 route does over HTTP.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Awaitable, Callable

import grpc
from fastapi import HTTPException

from models.artifact import store
from models.errors import ModelNotFound, TuneserveError
from service.admission import Overloaded
from service.auth import keyring
from service.dataplane import DataPlane
from service.oip import core
from service.oip import grpc_predict_v2_pb2 as pb
from service.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from service.pool import count_request

log = logging.getLogger("tuneserve.service")

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_code(http_status: int) -> grpc.StatusCode:
    return STATUS_CODES.get(http_status, grpc.StatusCode.INTERNAL if http_status >= 500 else grpc.StatusCode.INVALID_ARGUMENT)


def guarded(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Authenticate the call (when reads are protected), and turn a refusal into its gRPC status."""

    @functools.wraps(handler)
    async def call(self: "InferenceServicer", request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self.authenticate(context)
            return await handler(self, request, context)
        except Overloaded as error:  # the protocol's answer to "try again later", as Triton gives it
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except (TuneserveError, HTTPException) as error:
            status = getattr(error, "status", None) or getattr(error, "status_code", 400)
            message = str(getattr(error, "detail", None) or error)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # as over HTTP: logged, and answered without internals
            log.exception("gRPC %s failed", handler.__name__)
            status, message = 500, f"internal error: {type(error).__name__}"
        await context.abort(status_code(status), message)

    return call


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's RPCs over one worker's data plane (see the module docstring)."""

    def __init__(self, plane: DataPlane, settings: Any):
        self.plane = plane
        self.settings = settings
        self.keys = keyring(settings)

    def authenticate(self, context: grpc.aio.ServicerContext) -> None:
        if self.keys.config.protect_reads:
            metadata = dict(context.invocation_metadata() or ())
            self.keys.identify(metadata.get("authorization"))

    @guarded
    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @guarded
    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.pool.ready())

    @guarded
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=core.SERVER_NAME, version=core.server_version(), extensions=core.EXTENSIONS)

    @guarded
    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        try:
            await self.plane.resolve(model_ref(request.name, request.version))
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @guarded
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        classifier = await self.plane.resolve(model_ref(request.name, request.version))
        versions = [v.version for v in await asyncio.to_thread(lambda: store.list_models().get(classifier.name, []))]
        described = core.model_metadata(classifier, versions)
        tensors = {side: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in described[side]] for side in ("inputs", "outputs")}
        return pb.ModelMetadataResponse(name=described["name"], versions=versions, platform=described["platform"], **tensors)

    @guarded
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        with self.plane.admission.admitted("grpc"):  # one in-flight bound per worker, HTTP and gRPC together
            classifier = await self.plane.resolve(model_ref(request.model_name, request.model_version))
            try:
                result, outputs = await core.infer(self.plane, classifier, inference_of(request), self.settings.max_batch)
            except TuneserveError:
                count_request("grpc_infer", classifier.name, "refused")
                raise
        count_request("grpc_infer", classifier.name, "ok")
        return response_of(result.model, result.version, request.id, outputs, result.request_ids)


def model_ref(name: str, version: str) -> str:
    """`name` or `name:version`, each checked against the store's naming rule."""
    for part, what in ((name, "model name"), (version, "model version")):
        if (part or what == "model name") and not store.NAME_PATTERN.match(part):
            raise core.ProtocolError(f"{what} {part!r} is not valid: {store.NAME_PATTERN.pattern}")
    return f"{name}:{version}" if version else name


def parameter(value: pb.InferParameter) -> Any:
    choice = value.WhichOneof("parameter_choice")
    return getattr(value, choice) if choice else None


def inference_of(request: pb.ModelInferRequest) -> core.Inference:
    """The protocol core's request from the gRPC message (raw contents, or typed contents)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise core.ProtocolError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    inputs = []
    for index, tensor in enumerate(request.inputs):
        values = tensor.contents.bytes_contents if tensor.datatype == "BYTES" else tensor.contents.uint_contents
        inputs.append(core.InputTensor(tensor.name, tensor.datatype, list(tensor.shape),
                                       raw=raw[index] if raw else None, data=None if raw else list(values)))
    outputs = [core.RequestedOutput(o.name, parameter(o.parameters["classification"]) if "classification" in o.parameters else None)
               for o in request.outputs]
    min_confidence = parameter(request.parameters["min_confidence"]) if "min_confidence" in request.parameters else None
    return core.Inference(inputs, outputs, request.id or None, min_confidence)


def response_of(model: str, version: str, request_id: str, outputs: list[core.OutputTensor],
                request_ids: list[str] | None = None) -> pb.ModelInferResponse:
    """Every output as raw contents, encoded as Triton does (tritonclient.grpc reads them so); a
    classification's server-made `request_ids` (for POST /feedback) comma-separated in `parameters`."""
    parameters = {"request_ids": pb.InferParameter(string_param=",".join(request_ids))} if request_ids else {}
    return pb.ModelInferResponse(
        model_name=model, model_version=version, id=request_id, parameters=parameters,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name=o.name, datatype=o.datatype, shape=o.shape) for o in outputs],
        raw_output_contents=[o.raw() for o in outputs],
    )


async def start_grpc(plane: DataPlane, settings: Any) -> grpc.aio.Server | None:
    """This worker's gRPC server on the shared port (None when TUNESERVE_GRPC_PORT is 0 or cannot be bound)."""
    port = settings.grpc_port
    if not port:
        return None
    limit = settings.max_body_bytes
    server = grpc.aio.server(maximum_concurrent_rpcs=settings.grpc_max_concurrent_calls, options=[
        ("grpc.so_reuseport", 1),  # every worker binds the port; the kernel spreads connections
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", max(limit, 4 * 1024 * 1024)),
    ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane, settings), server)
    try:
        server.add_insecure_port(f"0.0.0.0:{port}")
    except RuntimeError as error:  # e.g. another user's server holds the port: HTTP still serves
        log.error("no gRPC: cannot bind port %d (TUNESERVE_GRPC_PORT; 0 turns gRPC off): %s", port, error)
        return None
    await server.start()
    log.info("gRPC (Open Inference Protocol) on port %d, messages up to %d bytes", port, limit)
    return server
