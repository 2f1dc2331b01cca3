"""A new model.onnx = a source graph's body (up to its `embedding`) + a linear head, with `onnx` alone.

The source's own head is pruned, so the new graph keeps the contract: uint8 `image` →
`logits`, `probabilities`, `embedding`, and it is as fast as the source.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

from models.transfer.heads import LinearHead

OUTPUTS = ("logits", "probabilities")
PREFIX = "instant_head"


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a control-flow node's subgraphs read from the outer scope (kept alive by pruning)."""
    names: set[str] = set()
    for attribute in node.attribute:
        for graph in [attribute.g, *attribute.graphs] if attribute.type in (5, 10) else []:
            for inner in graph.node:
                names.update(inner.input)
                names.update(_subgraph_inputs(inner))
    return names


def prune_to(graph: onnx.GraphProto, keep_outputs: set[str]) -> None:
    """Drop the nodes, initializers and value_info nothing in `keep_outputs` depends on."""
    needed = set(keep_outputs)
    kept = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
            needed.update(_subgraph_inputs(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for info in graph.value_info:
        if info.name == old:
            info.name = new


def head_nodes(head: LinearHead, embedding: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    source = embedding
    nodes = []
    if head.normalise:
        nodes.append(helper.make_node("LpNormalization", [embedding], [f"{PREFIX}/unit"], axis=1, p=2, name=f"{PREFIX}/l2"))
        source = f"{PREFIX}/unit"
    nodes += [
        helper.make_node("MatMul", [source, f"{PREFIX}/weight_t"], [f"{PREFIX}/scores"], name=f"{PREFIX}/matmul"),
        helper.make_node("Add", [f"{PREFIX}/scores", f"{PREFIX}/bias"], ["logits"], name=f"{PREFIX}/add"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name=f"{PREFIX}/softmax"),
    ]
    initializers = [
        numpy_helper.from_array(head.weight.T.copy(), f"{PREFIX}/weight_t"),
        numpy_helper.from_array(head.bias.copy(), f"{PREFIX}/bias"),
    ]
    return nodes, initializers


def attach_head(source: onnx.ModelProto, head: LinearHead, embedding: str = "embedding") -> onnx.ModelProto:
    """The source graph with its head replaced by `head`; checked before it is returned."""
    model = onnx.ModelProto()
    model.CopyFrom(source)
    graph = model.graph
    if embedding not in [o.name for o in graph.output]:
        raise ValueError(f"the source graph has no {embedding!r} output; outputs: {[o.name for o in graph.output]}")
    embedding_info = next(o for o in graph.output if o.name == embedding)
    for name in OUTPUTS:  # the source's own head tensors must not collide with the new ones
        _rename_tensor(graph, name, f"source/{name}")
    prune_to(graph, {embedding})
    nodes, initializers = head_nodes(head, embedding)
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    classes = int(head.weight.shape[0])
    del graph.output[:]
    graph.output.extend([
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [_batch_dim(embedding_info), classes]),
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [_batch_dim(embedding_info), classes]),
        embedding_info,
    ])
    onnx.checker.check_model(model, full_check=True)
    return model


def _batch_dim(info: onnx.ValueInfoProto) -> str | int | None:
    dims = info.type.tensor_type.shape.dim
    if not dims:
        return "N"
    first = dims[0]
    return first.dim_param or (first.dim_value if first.HasField("dim_value") else "N")
