"""A tiny convolutional classifier built without torch, for INT8 quantization tests.

It has the exported graphs' shape: uint8 `image [N, S, S, 3]` → transpose, cast, normalise
(`(x - 127) / 128`) → conv, relu, conv, relu → global mean (`embedding`) → Gemm head (`logits`)
→ softmax (`probabilities`). The weights make it a colour classifier (red, green, blue), so a
quantized copy can be checked for real answers, and there is something for int8 to speed up.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.data.datasets import Sample
from models.artifact.manifest import Manifest, Preprocessing, write_eval, write_manifest

LABELS = ["red", "green", "blue"]
CHANNELS = 8


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    conv1 = rng.normal(0, 0.05, (CHANNELS, 3, 3, 3)).astype(np.float32)
    conv2 = rng.normal(0, 0.05, (CHANNELS, CHANNELS, 3, 3)).astype(np.float32)
    for c in range(3):  # channel c passes colour c through both layers (centre taps)
        conv1[c, c, 1, 1] = 1.0
        conv2[c, c, 1, 1] = 1.0
    head = np.zeros((len(LABELS), CHANNELS), np.float32)
    head[:, :3] = np.eye(3) * 8.0
    return {
        "mean": np.full((1, 3, 1, 1), 127.0, np.float32),
        "std": np.full((1, 3, 1, 1), 128.0, np.float32),
        "conv1.w": conv1, "conv1.b": np.zeros(CHANNELS, np.float32),
        "conv2.w": conv2, "conv2.b": np.zeros(CHANNELS, np.float32),
        "head.w": head, "head.b": np.zeros(len(LABELS), np.float32),
        "axes": np.array([2, 3], np.int64),
    }


def tiny_conv_graph(seed: int = 0) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["nchw"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["pixels", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["normalised"]),
        helper.make_node("Conv", ["normalised", "conv1.w", "conv1.b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.w", "conv2.b"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("ReduceMean", ["r2", "axes"], ["embedding"], keepdims=0),
        helper.make_node("Gemm", ["embedding", "head.w", "head.b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    for i, node in enumerate(nodes):
        node.name = f"{node.op_type.lower()}_{i}"
    graph = helper.make_graph(
        nodes, "tiny-conv",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", None, None, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(LABELS)]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(LABELS)]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", CHANNELS])],
        initializer=[numpy_helper.from_array(v, k) for k, v in _weights(seed).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def write_tiny_conv_model(directory: Path, size: int = 16, accuracy: float | None = 1.0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_conv_graph(), str(directory / "model.onnx"))
    manifest = Manifest(
        labels=LABELS, preprocessing=Preprocessing(size=size, resize=size, mean=(127,) * 3, std=(128,) * 3),
        backbone="tiny-conv", source="none", opset=18, parity_max_abs_diff=0.0, embedding_output="embedding",
        training={"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0, "top_k": 2},
    )
    write_manifest(manifest, directory)
    if accuracy is not None:
        write_eval({"accuracy": accuracy, "top_k_accuracy": 1.0, "samples": 12}, directory)
    return directory


def noisy_colour_images(root: Path, per_class: int = 16, size: int = 16, seed: int = 0) -> list[Sample]:
    """PNGs of each label's colour with noise, folder per class; returns the samples."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    samples = []
    for index, label in enumerate(LABELS):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (size, size, 3))
            pixels[..., index] += 140
            path = root / label / f"{i:03d}.png"
            Image.fromarray(pixels.astype(np.uint8)).save(path)
            samples.append(Sample(path, label))
    return samples
