"""Static INT8 variants of a model version: ONNX Runtime QDQ, per-channel int8 weights.

Torch-free (onnxruntime.quantization + numpy), so training, the CLI and the service can use it.

What is quantized: the backbone after its first Conv/MatMul. The graph takes uint8 pixels and
casts and normalises them itself; those nodes stay float, and so does the first conv (the stem):
quantizing the normalised 3-channel input and the stem's 27-weight kernels doubled the mean
probability difference on digits (0.0022 → 0.0047; top-1 agreement 99.3 % → 98.9 %), for ~3 %
of EfficientNet-Lite0's multiply-adds. Everything from the global pooling and the head's
Gemm/MatMul to the outputs stays float too: `logits`, `probabilities` (with any temperature baked
in) and `embedding` keep their float precision, and the head is a negligible share of the compute.

Activations are uint8 (asymmetric), weights int8 per output channel: ONNX Runtime's x86 kernels
run U8S8 on VNNI/AVX2; S8S8 activations ran slower than fp32 on this machine (docs/benchmarks.md, precision variants).

Calibration runs a few hundred training images through `models.serving.preprocess` (the serving path);
MinMax, Entropy and Percentile are each tried and the one closest to fp32 on the validation split
is kept (top-1 agreement, then mean |Δp|, then accuracy: on a hundred validation images one image
of accuracy is noise, while the probability difference is measured on every image). The
kept graph is then compared with fp32 on the test split (`eval.json` → `variants.int8`) and
listed in the manifest (`variants.int8`), which is what serving's precision choice reads.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from models.artifact.manifest import (
    EVAL_FILE,
    INT8_FILE,
    MANIFEST_FILE,
    ONNX_FILE,
    Manifest,
    Variant,
    read_eval,
    read_manifest,
)
from models.data.metrics import evaluation_report
from models.artifact.quantize_inputs import Images, QuantizeConfig, QuantizeData, QuantizeError

log = logging.getLogger("tuneserve.quantize")

COMPUTE_OPS = frozenset({"Conv", "MatMul", "Gemm"})
# Walking back from the outputs, a pooling node is where the backbone's feature map ends: it
# stays float, and so does what follows it, but the activation before it is still quantized
# (otherwise the last conv, whose output it reads, would run in float).
POOLING_OPS = frozenset({"ReduceMean", "GlobalAveragePool", "AveragePool", "GlobalMaxPool", "ReduceMax"})
QUANTIZED_OPS = ["Conv", "MatMul", "Gemm", "Add", "Mul", "Clip", "Relu", "MaxPool", "AveragePool",
                 "GlobalAveragePool", "Concat"]



# --------------------------------------------------------------------------- graph


def float_nodes(graph) -> list[str]:
    """Nodes that stay float: input → the first compute op, inclusive (cast, normalise, shape
    arithmetic, the stem conv), and outputs ← the head's Gemm/MatMul or the global pooling
    (softmax, temperature, the embedding)."""
    consumers: dict[str, list] = defaultdict(list)
    producer = {}
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
        for name in node.output:
            producer[name] = node
    keep: set[str] = set()
    frontier = [i.name for i in graph.input]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name not in keep:
                keep.add(node.name)
                if node.op_type not in COMPUTE_OPS:  # the stem stays float; what follows it is quantized
                    frontier.extend(node.output)
    frontier = [o.name for o in graph.output]
    while frontier:
        node = producer.get(frontier.pop())
        if node is None or node.name in keep or node.op_type == "Conv":
            continue
        keep.add(node.name)
        if node.op_type not in COMPUTE_OPS | POOLING_OPS:  # the head and the pooling stay float; stop there
            frontier.extend(node.input)
    return sorted(keep)


def _named(model) -> None:
    """nodes_to_exclude works by name; give unnamed nodes one."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def _batch_reader(input_name: str, images: np.ndarray, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class BatchReader(CalibrationDataReader):
        """Batches of uint8 images; `set_range` lets calibration run a batch at a time (bounded memory)."""

        def __init__(self) -> None:
            self.batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
            self.set_range(0, len(self.batches))

        def __len__(self) -> int:
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._pending = iter(self.batches[start_index:end_index])

        def get_next(self):
            batch = next(self._pending, None)
            return None if batch is None else {input_name: batch}

    return BatchReader()


def _prepared_graph(source: Path, workdir: Path):
    """ONNX Runtime's recommended pre-processing (shape inference, basic fusions), named nodes."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = workdir / "prepared.onnx"
    try:
        quant_pre_process(str(source), str(prepared))
        model = onnx.load(str(prepared))
    except Exception as error:  # noqa: BLE001 - pre-processing is an optimisation, not a requirement
        log.warning("quantization pre-processing failed (%s); quantizing the graph as exported", error)
        model = onnx.load(str(source))
    _named(model)
    onnx.save(model, str(prepared))
    return prepared, model


def quantize_graph(source: Path, target: Path, calibration: np.ndarray, method: str, config: QuantizeConfig,
                   input_name: str = "image") -> Path:
    """Write the static QDQ int8 version of `source` to `target`, calibrated with `method`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory(prefix="tuneserve-quantize-") as scratch:
        prepared, model = _prepared_graph(Path(source), Path(scratch))
        # ONNX Runtime's histogram calibrators print progress to stdout, which carries the CLI's
        # JSON result (`tuneserve train ... | jq`): send their chatter to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            quantize_static(
                str(prepared), str(target), _batch_reader(input_name, calibration, config.batch_size),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=float_nodes(model.graph),
                calibrate_method=calibrate,
                extra_options={"CalibStridedMinMax": 1, "CalibPercentile": config.percentile},
            )
    return Path(target)


def run_graph(path: Path, images: np.ndarray, manifest: Manifest, batch_size: int = 64) -> np.ndarray:
    """Probabilities of the graph at `path` on CPU, batch by batch."""
    import onnxruntime as ort

    settings = ort.SessionOptions()
    settings.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=settings, providers=["CPUExecutionProvider"])
    output = manifest.output_names[1]
    rows = [session.run([output], {manifest.input_name: images[i : i + batch_size]})[0]
            for i in range(0, len(images), batch_size)]
    return np.concatenate(rows)


# --------------------------------------------------------------------------- comparison


def agreement(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """How far `candidate` probabilities are from `reference` (fp32), and its accuracy when labelled."""
    scores = {
        "agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
        "max_probability_diff": float(np.abs(reference - candidate).max()),
        "mean_probability_diff": float(np.abs(reference - candidate).mean()),
    }
    if labels is not None:
        scores["accuracy"] = float((candidate.argmax(1) == labels).mean())
    return scores


def _rank(scores: dict[str, float]) -> tuple[float, float, float]:
    """Closest to fp32 first; accuracy only breaks ties (see the module docstring)."""
    return scores["agreement"], -scores["mean_probability_diff"], scores.get("accuracy", 0.0)


def choose_calibration(source: Path, data: QuantizeData, manifest: Manifest, config: QuantizeConfig,
                       workdir: Path) -> tuple[str, Path, dict[str, dict[str, float]]]:
    """Quantize with each method; keep the one closest to fp32 on validation (+ spare train images).

    Accuracy is measured on the validation split; agreement and |Δp| on it and on the training
    images calibration did not use, which needs no labels and makes the ranking less noisy.
    """
    images = data.fidelity_images()
    reference = run_graph(source, images, manifest)
    tried: dict[str, dict[str, float]] = {}
    for method in config.methods:
        target = workdir / f"{method}.onnx"
        try:
            quantize_graph(source, target, data.calibration, method, config, manifest.input_name)
            probabilities = run_graph(target, images, manifest)
        except Exception as error:  # noqa: BLE001 - one calibrator failing leaves the others
            log.warning("int8 %s calibration failed: %s", method, error)
            tried[method] = {"error": str(error)}
            continue
        tried[method] = {**agreement(reference, probabilities), "images": len(images)}
        if data.validation.labels is not None:
            validation = probabilities[: len(data.validation)]
            tried[method]["accuracy"] = float((validation.argmax(1) == data.validation.labels).mean())
        log.info("int8 %s on validation: %s", method, tried[method])
    ranked = [m for m in config.methods if "error" not in tried[m]]
    if not ranked:
        raise QuantizeError(f"every calibration method failed: {tried}")
    best = max(ranked, key=lambda m: _rank(tried[m]))
    return best, workdir / f"{best}.onnx", tried


def compare_on_test(manifest: Manifest, reference: np.ndarray, candidate: np.ndarray, test: Images) -> dict[str, Any]:
    """The `eval.json` entry: the variant's metrics, its fp32 counterpart's on the same images, deltas."""
    entry: dict[str, Any] = {"samples": len(test), **agreement(reference, candidate)}
    if test.labels is None:
        entry["accuracy_delta"] = None
        return entry
    top_k = int((manifest.training or {}).get("top_k", 5))
    ours = evaluation_report(test.labels, candidate, manifest.labels, top_k=top_k)
    base = evaluation_report(test.labels, reference, manifest.labels, top_k=top_k)
    entry.update(
        accuracy=ours["accuracy"], macro_f1=ours["macro_avg"]["f1"], top_k=ours["top_k"],
        top_k_accuracy=ours["top_k_accuracy"],
        fp32={"accuracy": base["accuracy"], "macro_f1": base["macro_avg"]["f1"], "top_k_accuracy": base["top_k_accuracy"]},
        accuracy_delta=ours["accuracy"] - base["accuracy"],
        macro_f1_delta=ours["macro_avg"]["f1"] - base["macro_avg"]["f1"],
        per_class_f1={label: ours["per_class"][label]["f1"] for label in manifest.labels},
    )
    return entry


# --------------------------------------------------------------------------- one version


def _write_atomically(path: Path, data: bytes) -> None:
    """Readers (a serving worker loading this version) see the old file or the new one, never half."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def quantize_version(directory: str | Path, data: QuantizeData, config: QuantizeConfig = QuantizeConfig()) -> Variant:
    """Write `model.int8.onnx` into a version's folder, its test comparison into `eval.json`
    (`variants.int8`) and the variant into `manifest.json`, in that order (the manifest last, so
    a reader that sees the variant finds its file)."""
    config.validate()
    directory = Path(directory)
    manifest = read_manifest(directory)
    source = directory / ONNX_FILE
    with tempfile.TemporaryDirectory(prefix="tuneserve-int8-") as scratch:
        method, chosen, tried = choose_calibration(source, data, manifest, config, Path(scratch))
        entry = compare_on_test(manifest, run_graph(source, data.test.arrays, manifest),
                                run_graph(chosen, data.test.arrays, manifest), data.test)
        _write_atomically(directory / INT8_FILE, chosen.read_bytes())
    entry = {"file": INT8_FILE, "calibration": method, "calibration_images": len(data.calibration),
             "evaluated_on": data.evaluated_on, **entry, "validation": tried}
    report = read_eval(directory) or {}
    report.setdefault("variants", {})["int8"] = entry
    _write_atomically(directory / EVAL_FILE, json.dumps(report, indent=2).encode())
    variant = Variant(
        file=INT8_FILE, calibration=method, calibration_images=len(data.calibration),
        evaluated_on=data.evaluated_on, samples=entry["samples"], accuracy=entry.get("accuracy"),
        accuracy_delta=entry["accuracy_delta"], agreement=entry["agreement"],
        max_probability_diff=entry["max_probability_diff"],
    )
    updated = manifest.model_copy(update={"variants": {**manifest.variants, "int8": variant}})
    _write_atomically(directory / MANIFEST_FILE, updated.model_dump_json(indent=2).encode())
    log.info("int8 variant of %s: %s calibration, %s", directory, method, variant.model_dump(exclude={"file"}))
    return variant
