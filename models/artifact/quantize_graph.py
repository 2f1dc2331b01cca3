"""Which nodes of a classifier graph an INT8 variant quantizes (models/artifact/quantize.py): the
backbone after its first stage, and nothing else.

The first stage (input → the first downsampling conv after the stem) stays float: the cast and
normalisation of the uint8 pixels, the stem, and the blocks at the stem's resolution. Quantizing
EfficientNet-Lite0's first block alone took its top-1 agreement with fp32 on photo crops to 60 %
(logits 9.5 dB from fp32), worse than all later blocks together, for about 3 % of the
multiply-adds. Every node from which no conv can be reached stays float too: global pooling, a
multi-depth head's grid pooling, concatenation and feature standardisation (one uint8 scale over
ten thousand standardised features), the head's Gemm, temperature and softmax.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

COMPUTE_OPS = frozenset({"Conv", "MatMul", "Gemm"})
# An elementwise activation right after a backbone conv is quantized with it (ONNX Runtime folds a
# Clip/Relu into the conv's output range), even when only pooling reads it (the last conv).
ACTIVATION_OPS = frozenset({"Clip", "Relu"})


def _edges(graph) -> tuple[dict[str, list], dict[str, Any]]:
    consumers: dict[str, list] = defaultdict(list)
    producer = {}
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
        for name in node.output:
            producer[name] = node
    return consumers, producer


def _strided(node) -> bool:
    return node.op_type == "Conv" and any(a.name == "strides" and max(a.ints, default=1) > 1 for a in node.attribute)


def _first_stage(graph, consumers) -> set[str]:
    """Input → the first downsampling conv after the stem, exclusive: cast, normalise, shape
    arithmetic on the input, the stem and the blocks at the stem's resolution. Without a strided
    conv after the stem (a toy graph), input → the stem, inclusive."""
    keep: set[str] = set()
    frontier, stem, downsamples = [i.name for i in graph.input], None, False
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name in keep:
                continue
            if stem is not None and _strided(node):
                downsamples = True  # the first stage ends here; this conv and what follows are quantized
                continue
            stem = stem or (node.name if node.op_type == "Conv" else None)  # not a head Gemm met via shape ops
            keep.add(node.name)
            frontier.extend(node.output)
    return keep if downsamples else _stem(graph, consumers)


def _stem(graph, consumers) -> set[str]:
    """Input → the first compute op, inclusive."""
    keep: set[str] = set()
    frontier = [i.name for i in graph.input]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name not in keep:
                keep.add(node.name)
                if node.op_type not in COMPUTE_OPS:
                    frontier.extend(node.output)
    return keep


def _backbone(graph, consumers, producer) -> set[str]:
    """Convs, every node from which a conv can be reached, and the activation right after a conv
    (ONNX node lists are topologically sorted, so one reverse pass sees every consumer first)."""
    reaches: set[str] = set()
    for node in reversed(graph.node):
        if node.op_type == "Conv" or any(c.name in reaches for out in node.output for c in consumers.get(out, [])):
            reaches.add(node.name)
    for node in graph.node:
        source = producer.get(node.input[0]) if node.input else None
        if node.op_type in ACTIVATION_OPS and source is not None and source.op_type == "Conv":
            reaches.add(node.name)
    return reaches


def float_nodes(graph) -> list[str]:
    """Nodes that stay float: the first stage (input → the first downsampling conv after the stem)
    and everything that is not backbone (no conv reachable from it: pooling, standardisation, the
    head, softmax)."""
    consumers, producer = _edges(graph)
    backbone = _backbone(graph, consumers, producer)
    return sorted(_first_stage(graph, consumers) | {n.name for n in graph.node if n.name not in backbone})
