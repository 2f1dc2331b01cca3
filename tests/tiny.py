"""Tiny ONNX classifiers built without torch, for fast tests of models/, service/ and scoring.

The graph honours the contract: uint8 `image [N, S, S, 3]` → `logits`, `probabilities [N, C]`,
and with `embedding=True` also `embedding [N, 3]` (the per-channel mean colour the head reads);
`embedding=<[3, D] array>` gives `mean colour @ array` instead (a worse or better feature space,
for tests that rank sources).
Logits are a fixed linear map of the per-channel mean colour, so a red image is predictably
"red" and tests can assert real answers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.artifact.manifest import EMBEDDING_OUTPUT, Manifest, Preprocessing, write_eval, write_manifest

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def tiny_graph(num_classes: int, weights: np.ndarray | None = None, opset: int = 18,
               embedding: bool | np.ndarray = False) -> onnx.ModelProto:
    if weights is None:
        weights = np.zeros((3, num_classes), np.float32)
        for i in range(min(3, num_classes)):
            weights[i, i] = 0.05
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes]),
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", num_classes]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
        numpy_helper.from_array(weights.astype(np.float32), "w"),
    ]
    if isinstance(embedding, np.ndarray):
        nodes.append(helper.make_node("MatMul", ["mean", "projection"], [EMBEDDING_OUTPUT]))
        initializers.append(numpy_helper.from_array(embedding.astype(np.float32), "projection"))
        outputs.append(helper.make_tensor_value_info(EMBEDDING_OUTPUT, TensorProto.FLOAT, ["N", embedding.shape[1]]))
    elif embedding:
        nodes.append(helper.make_node("Identity", ["mean"], [EMBEDDING_OUTPUT]))
        outputs.append(helper.make_tensor_value_info(EMBEDDING_OUTPUT, TensorProto.FLOAT, ["N", 3]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", None, None, 3])],
        outputs,
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def write_tiny_model(
    directory: Path,
    labels: list[str] = ("red", "green", "blue"),
    size: int = 16,
    weights: np.ndarray | None = None,
    accuracy: float | None = None,
    embedding: bool | np.ndarray = False,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_graph(len(labels), weights, embedding=embedding), str(directory / "model.onnx"))
    manifest = Manifest(
        labels=list(labels),
        preprocessing=Preprocessing(size=size, resize=size, mean=(0, 0, 0), std=(1, 1, 1)),
        backbone="tiny-mean-colour",
        source="none",
        opset=18,
        parity_max_abs_diff=0.0,
        embedding_output=EMBEDDING_OUTPUT if embedding is not False else None,
    )
    write_manifest(manifest, directory)
    if accuracy is not None:
        write_eval({"accuracy": accuracy, "top_k_accuracy": 1.0, "samples": 3}, directory)
    return directory


def solid_png(colour: str | tuple[int, int, int], size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    import io

    from PIL import Image

    rgb = COLOURS[colour] if isinstance(colour, str) else colour
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format=fmt)
    return buffer.getvalue()


def noisy_colour_samples(directory: Path, per_class: int, seed: int, labels=("red", "green", "blue")) -> list:
    """PNG files of colours near each primary (other channels up to 150, so some are ambiguous) as Samples."""
    from PIL import Image

    from models.data.datasets import Sample

    rng = np.random.default_rng(seed)
    samples = []
    for c, label in enumerate(labels):
        (directory / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rgb = rng.integers(0, 150, 3)
            rgb[c % 3] = rng.integers(110, 256)
            path = directory / label / f"{i}.png"
            Image.new("RGB", (16, 16), tuple(int(v) for v in rgb)).save(path)
            samples.append(Sample(path, label))
    return samples


def write_trusted_tiny_model(directory: Path, data: Path, labels=("red", "green", "blue")) -> Path:
    """A tiny model with an embedding, calibrated at 'export' the way training does it (torch-free):
    a fitted temperature in the graph and manifest, per-label thresholds, and the in-domain score."""
    from models.serving.trust import calibrate_version

    write_tiny_model(directory, labels=labels, embedding=True)
    train = noisy_colour_samples(data / "train", 40, seed=1, labels=labels)
    val = noisy_colour_samples(data / "val", 30, seed=2, labels=labels)
    calibrate_version(directory, "tiny", train, val)
    return directory
