"""The protocol core that REST and gRPC share: their tensors in, an `InferenceRequest` to the data
plane, the `InferenceResult` back as output tensors. Transport encodings live in rest.py and
grpc_server.py.

One input tensor per request: `BYTES [N]`, one encoded image (JPEG, PNG, …) per element; or
`UINT8 [N, S, S, 3]` already at the manifest's size S. Outputs: `probabilities` and `logits`, FP32
`[N, C]`; with the classification extension (`classification: k` on a requested output) BYTES
`[N, k]` of "value:index:label", the k most probable labels. With the request parameter
`min_confidence` (a number or "auto") three more outputs carry /classify's decision: `label` BYTES
`[N]` ("" where abstained), `abstained` BOOL `[N]`, and `in_domain` FP32 `[N]` for versions with an
in-domain score.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from models.errors import TuneserveError
from models.serving.runtime import OnnxClassifier
from service.dataplane import DataPlane, InferenceRequest, InferenceResult

EXTENSIONS = ["classification", "binary_tensor_data"]
OUTPUTS = ("probabilities", "logits")
EVIDENCE = "evidence"  # FP32 [N, C, side, side], only when named (docs/explain.md): never computed into an answer otherwise
PLATFORM = "onnxruntime_onnx"
SERVER_NAME = "tuneserve"


class ProtocolError(TuneserveError):
    """A request the protocol or the model cannot take (400 unless said otherwise)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class InputTensor:
    """One input as sent: its bytes (binary extension, gRPC raw contents) or its `data` values."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes | None = None
    data: list[Any] | None = None


@dataclass
class RequestedOutput:
    name: str
    classification: Any = None  # k for the classification extension (checked in `_top_k`)
    binary: bool | None = None  # REST only: this output as binary data; None: the request's default


@dataclass
class Inference:
    """A parsed inference request, whatever the transport."""

    inputs: list[InputTensor]
    outputs: list[RequestedOutput] = field(default_factory=list)  # empty: all of OUTPUTS
    id: str | None = None
    min_confidence: Any = None


@dataclass
class OutputTensor:
    name: str
    datatype: str  # FP32, BYTES or BOOL
    shape: list[int]
    values: np.ndarray  # float32 / bool; BYTES: an object array of bytes
    binary: bool | None = None

    def raw(self) -> bytes:
        """Triton's binary encoding: little-endian values; BYTES elements each a 4-byte length + bytes."""
        if self.datatype == "BYTES":
            return b"".join(len(item).to_bytes(4, "little") + item for item in self.values.ravel())
        return np.ascontiguousarray(self.values).tobytes()

    def data(self) -> list[Any]:
        """The flat JSON `data`: numbers, booleans, or UTF-8 strings for BYTES."""
        if self.datatype == "BYTES":
            return [item.decode("utf-8") for item in self.values.ravel()]
        return self.values.ravel().tolist()


def server_version() -> str:
    try:
        return version(SERVER_NAME)
    except PackageNotFoundError:
        return "unknown"


def model_metadata(classifier: OnnxClassifier, versions: list[str]) -> dict[str, Any]:
    """Name, versions, platform, and the input and output tensors a client may use."""
    size, classes = classifier.manifest.preprocessing.size, classifier.manifest.num_classes
    return {
        "name": classifier.name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                   {"name": "pixels", "datatype": "UINT8", "shape": [-1, size, size, 3]}],
        "outputs": [{"name": output, "datatype": "FP32", "shape": [-1, classes]} for output in OUTPUTS] + evidence_metadata(classifier),
    }


def evidence_metadata(classifier: OnnxClassifier) -> list[dict[str, Any]]:
    section = classifier.manifest.evidence
    if section is None or not section.available:
        return []
    return [{"name": EVIDENCE, "datatype": "FP32", "shape": [-1, classifier.manifest.num_classes, section.side, section.side]}]


# ---- inference ---------------------------------------------------------------------------------
async def infer(plane: DataPlane, classifier: OnnxClassifier, inference: Inference, max_batch: int) -> tuple[InferenceResult, list[OutputTensor]]:
    """One protocol request through the data plane; the output tensors asked for."""
    if len(inference.inputs) != 1:
        raise ProtocolError(f"inputs: send exactly one input tensor ('image' BYTES or 'pixels' UINT8), got {len(inference.inputs)}")
    wanted = inference.outputs or [RequestedOutput(name) for name in OUTPUTS]
    top_k = max([_top_k(output, classifier) for output in wanted] + [0])
    images, pixels = _images(inference.inputs[0], classifier, max_batch)
    asked = InferenceRequest(
        model=classifier, images=images, pixels=pixels, outputs=frozenset(o.name for o in wanted),
        top_k=top_k if inference.min_confidence in (None, "") else max(top_k, 1),
        min_confidence=inference.min_confidence, id=inference.id,
    )
    result = await plane.infer(asked)
    for index, error in result.failed[:1]:
        raise ProtocolError(f"image {index} of the batch: {error}", error.status)
    outputs = [_output(output, result) for output in wanted]
    if result.min_confidence is not None:
        outputs += decision_tensors(result)
    return result, outputs


def _top_k(output: RequestedOutput, classifier: OnnxClassifier) -> int:
    if output.name not in (*OUTPUTS, EVIDENCE):
        raise ProtocolError(f"unknown output {output.name!r}; this model gives {[*OUTPUTS, EVIDENCE]}")
    k = output.classification
    if k is None:
        return 0
    if output.name == EVIDENCE:
        raise ProtocolError("output 'evidence': the classification extension applies to probabilities and logits only")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ProtocolError(f"output {output.name!r}: classification must be a positive integer, got {k!r}")
    return min(k, classifier.manifest.num_classes)


def _count(shape: list[int]) -> int:
    return math.prod(shape) if shape else 0


def _images(tensor: InputTensor, classifier: OnnxClassifier, limit: int) -> tuple[list[bytes], np.ndarray | None]:
    """Encoded images (BYTES) or uint8 pixels (UINT8) of the one input tensor."""
    if any(not isinstance(d, int) or d < 0 for d in tensor.shape):
        raise ProtocolError(f"input {tensor.name!r}: shape must be non-negative integers, got {tensor.shape}")
    if tensor.datatype == "BYTES":
        images = bytes_elements(tensor)
        if len(images) > limit:
            raise ProtocolError(f"too many images: {len(images)}; limit is {limit} (TUNESERVE_MAX_BATCH)", 413)
        return images, None
    if tensor.datatype == "UINT8":
        return [], pixel_batch(tensor, classifier.manifest.preprocessing.size, limit)
    raise ProtocolError(f"input {tensor.name!r}: datatype must be BYTES (encoded images) or UINT8 (pixels), got {tensor.datatype!r}")


def bytes_elements(tensor: InputTensor) -> list[bytes]:
    """BYTES elements: from raw bytes (each a 4-byte little-endian length, then its bytes) or a list of bytes."""
    if tensor.raw is None:
        if not tensor.data or not all(isinstance(item, bytes) for item in tensor.data):
            raise ProtocolError("BYTES images must be sent with the binary tensor data extension (tritonclient does by default)")
        elements = list(tensor.data)
    else:
        elements = split_bytes(tensor.raw, tensor.name)
    if len(elements) != _count(tensor.shape) or not elements:
        raise ProtocolError(f"input {tensor.name!r}: shape {tensor.shape} but {len(elements)} elements were sent")
    return elements


def split_bytes(raw: bytes, name: str) -> list[bytes]:
    elements, position = [], 0
    while position < len(raw):
        if position + 4 > len(raw):
            raise ProtocolError(f"input {name!r}: a BYTES element length is cut off at byte {position}")
        length = int.from_bytes(raw[position: position + 4], "little")
        position += 4
        if position + length > len(raw):
            raise ProtocolError(f"input {name!r}: element {len(elements)} says {length} bytes; fewer follow")
        elements.append(raw[position: position + length])
        position += length
    return elements


def pixel_batch(tensor: InputTensor, size: int, limit: int) -> np.ndarray:
    """UINT8 `[N, size, size, 3]` from raw bytes or `data` values."""
    if len(tensor.shape) != 4 or tuple(tensor.shape[1:]) != (size, size, 3) or tensor.shape[0] < 1:
        raise ProtocolError(f"input {tensor.name!r}: UINT8 images must have shape [N, {size}, {size}, 3], got {tensor.shape}")
    if tensor.shape[0] > limit:
        raise ProtocolError(f"too many images: {tensor.shape[0]}; limit is {limit} (TUNESERVE_MAX_BATCH)", 413)
    if tensor.raw is not None:
        if len(tensor.raw) != _count(tensor.shape):
            raise ProtocolError(f"input {tensor.name!r}: shape {tensor.shape} needs {_count(tensor.shape)} bytes, got {len(tensor.raw)}")
        return np.frombuffer(tensor.raw, np.uint8).reshape(tensor.shape)
    try:
        values = np.asarray(tensor.data, dtype=np.int64).reshape(-1)
    except (ValueError, TypeError, OverflowError):
        raise ProtocolError(f"input {tensor.name!r}: UINT8 data must be integers 0..255") from None
    if values.size != _count(tensor.shape) or values.size and (values.min() < 0 or values.max() > 255):
        raise ProtocolError(f"input {tensor.name!r}: UINT8 data must be {_count(tensor.shape)} integers 0..255")
    return values.astype(np.uint8).reshape(tensor.shape)


def _output(requested: RequestedOutput, result: InferenceResult) -> OutputTensor:
    """FP32 `[N, C]`, or with the classification extension BYTES `[N, k]` of "value:index:label"."""
    values = result.stacked(requested.name)  # evidence: [N, C, side, side]
    k = requested.classification
    if k is None:
        return OutputTensor(requested.name, "FP32", list(values.shape), values.astype(np.float32, copy=False), requested.binary)
    k = min(k, values.shape[1])
    labels = result.classifier.manifest.labels
    entries = [f"{float(row[i])}:{i}:{labels[i]}".encode() for row, image in zip(values, result.images) for i in image.ranked[:k]]
    return OutputTensor(requested.name, "BYTES", [len(values), k], np.array(entries, dtype=np.object_).reshape(len(values), k), requested.binary)


def decision_tensors(result: InferenceResult) -> list[OutputTensor]:
    """/classify's decision as outputs: `label` ("" where abstained), `abstained`, and `in_domain`."""
    decided = [image.prediction for image in result.images]
    count = [len(decided)]
    outputs = [
        OutputTensor("label", "BYTES", count, np.array([(d.label or "").encode() for d in decided], dtype=np.object_)),
        OutputTensor("abstained", "BOOL", count, np.array([d.abstained for d in decided], dtype=bool)),
    ]
    if all(d.in_domain is not None for d in decided):
        outputs.append(OutputTensor("in_domain", "FP32", count, np.array([d.in_domain for d in decided], dtype=np.float32)))
    return outputs
