"""The OIP over REST: the JSON messages, and the binary tensor data extension both ways.

A request may carry its tensors after the JSON (`Inference-Header-Content-Length` says where the
JSON ends; each binary input says its `binary_data_size`), as tritonclient.http sends them. An
answer carries an output as binary data when asked: `"binary_data": true` in that output's
parameters, or `"binary_data_output": true` in the request's parameters for every output without
its own choice (tritonclient.http asks for binary by default). Binary outputs are the bytes Triton
sends: little-endian values; BYTES elements each a 4-byte little-endian length, then the bytes.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from service.oip.core import Inference, InputTensor, OutputTensor, ProtocolError, RequestedOutput

HEADER_LENGTH = "Inference-Header-Content-Length"


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


class OutputParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    classification: Annotated[int, Field(ge=1, strict=True)] | None = Field(
        None, description="The top k labels as BYTES [N, k] of \"value:index:label\" (the classification extension)")
    binary_data: StrictBool | None = Field(None, description="This output as binary data after the JSON")


class OutputRequest(BaseModel):
    name: Literal["probabilities", "logits", "evidence"]
    parameters: OutputParameters | None = None


MIN_CONFIDENCE = {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "string", "enum": ["auto"]}, {"type": "null"}]}


class RequestParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    # checked by the data plane's one rule (service/dataplane.py), so /v2 refuses what /classify refuses, with its 422
    min_confidence: Any = Field(None, json_schema_extra=MIN_CONFIDENCE, description=(
        "Abstain below this probability (a number in [0, 1], or `auto` for the version's thresholds): adds the "
        "outputs label, abstained and in_domain"))
    binary_data_output: StrictBool | None = Field(None, description="Every output without its own choice as binary data")


class InferRequest(BaseModel):
    id: str | None = None
    parameters: RequestParameters | None = None
    inputs: list[InferInput] = Field(min_length=1, max_length=1)
    outputs: list[OutputRequest] | None = None


class InferOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data_size": n} for an output sent as binary data')


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="request_ids: one per image of a classification "
                                              "(POST /feedback takes them)")
    outputs: list[InferOutput]


def parse_request(body: bytes, declared: str | None) -> tuple[Inference, bool]:
    """The inference request in `body` (binary inputs after `declared` bytes of JSON), and whether
    outputs without their own choice are wanted as binary data."""
    if declared is None:
        header, binary = body, b""
    else:
        if not declared.isdigit() or int(declared) > len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {declared!r} is not a length within the body ({len(body)} bytes)")
        header, binary = body[: int(declared)], body[int(declared):]
    try:
        request = InferRequest.model_validate_json(header)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()[:5])
        raise ProtocolError(f"not an inference request: {problems}") from None
    parameters = request.parameters or RequestParameters()
    inputs = [_input(tensor, binary) for tensor in request.inputs]
    outputs = [_requested(output) for output in request.outputs or ()]
    return Inference(inputs, outputs, request.id, parameters.min_confidence), parameters.binary_data_output


def _input(tensor: InferInput, binary: bytes) -> InputTensor:
    """The input's values: its binary data, or its JSON `data`."""
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        if binary:
            raise ProtocolError(f"binary data follows the request but input {tensor.name!r} has no binary_data_size")
        if tensor.data is None:
            raise ProtocolError(f"input {tensor.name!r} has neither data nor binary_data_size")
        return InputTensor(tensor.name, tensor.datatype, tensor.shape, data=tensor.data)
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise ProtocolError(f"input {tensor.name!r}: binary_data_size {size!r} does not match the {len(binary)} bytes sent")
    return InputTensor(tensor.name, tensor.datatype, tensor.shape, raw=binary)


def _requested(output: OutputRequest) -> RequestedOutput:
    parameters = output.parameters or OutputParameters()
    return RequestedOutput(output.name, parameters.classification, parameters.binary_data)


def encode_response(model: str, version: str, request_id: str | None, outputs: list[OutputTensor], binary_default: bool | None,
                    request_ids: list[str] | None = None) -> Response:
    """JSON, or with any binary output the JSON header then the binary data (and its length header)."""
    described, blobs = [], []
    for output in outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        binary = output.binary if output.binary is not None else bool(binary_default)
        if binary:
            blobs.append(output.raw())
            entry["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            entry["data"] = output.data()
        described.append(entry)
    answer: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": described}
    if request_id is not None:
        answer["id"] = request_id
    if request_ids:
        answer["parameters"] = {"request_ids": request_ids}
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})
