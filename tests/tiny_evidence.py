"""A tiny torch-free model with an exact `evidence` output, for the service, OIP and console tests.

tests/tiny.py's mean-colour classifier is linear over the mean of a feature map, the image itself:
logits = Σ_xy pixel(x, y) @ w / S², so evidence[c, y, x] = pixel(y, x) @ w[:, c] / S² sums to the
logit exactly (bias 0), at the crop's own resolution S.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.artifact.manifest import EVIDENCE_OUTPUT, EvidenceSection, read_manifest, write_manifest
from tests.tiny import write_tiny_model


def add_evidence(model: onnx.ModelProto, size: int, num_classes: int) -> onnx.ModelProto:
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.array(size * size, np.float32), "positions"))
    graph.node.extend([
        helper.make_node("MatMul", ["x", "w"], ["per_position"]),
        helper.make_node("Div", ["per_position", "positions"], ["per_position_share"]),
        helper.make_node("Transpose", ["per_position_share"], [EVIDENCE_OUTPUT], perm=[0, 3, 1, 2]),
    ])
    graph.output.append(helper.make_tensor_value_info(EVIDENCE_OUTPUT, TensorProto.FLOAT, ["N", num_classes, size, size]))
    onnx.checker.check_model(model)
    return model


def write_explained_tiny_model(directory: Path, labels=("red", "green", "blue"), size: int = 16) -> Path:
    """tests/tiny.py's model (with an embedding) plus the evidence output and its manifest section."""
    write_tiny_model(directory, labels=list(labels), size=size, embedding=True)
    path = directory / "model.onnx"
    onnx.save(add_evidence(onnx.load(str(path)), size, len(labels)), str(path))
    manifest = read_manifest(directory)
    section = EvidenceSection(available=True, output=EVIDENCE_OUTPUT, side=size, max_error=0.0)
    write_manifest(manifest.model_copy(update={"evidence": section}), directory)
    return directory


def half_red_png(size: int = 16) -> bytes:
    """Left half red, right half black: the evidence for red is all on the left."""
    import io

    from PIL import Image

    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:, : size // 2, 0] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
