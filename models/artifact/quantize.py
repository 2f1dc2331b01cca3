"""Static INT8 variants of a model version: ONNX Runtime QDQ, per-channel int8 weights.

Torch-free (onnxruntime.quantization + numpy), so training, the CLI and the service can use it.

What is quantized: the backbone after its first stage, and nothing else
(`models/artifact/quantize_graph.py` says which nodes and why): the uint8 pixels' cast and
normalisation, the stem and the blocks at its resolution stay float, and so does everything from
which no conv can be reached (pooling, a multi-depth head's standardisation, the head, softmax), so
`logits`, `probabilities` and `embedding` keep float precision.

Activations are uint8 (asymmetric), weights int8 per output channel: ONNX Runtime's x86 kernels
run U8S8 on VNNI/AVX2; S8S8 activations ran slower than fp32 on this machine (docs/benchmarks.md, precision variants).

Calibration runs a few hundred training images through `models.serving.preprocess` (the serving
path). The methods are tried in order, cheapest first (MinMax needs no histograms), and the first
whose variant already passes the serving gate with top-1 agreement >= 99.5 % on the validation
images ends the search; otherwise the one closest to fp32 is kept (top-1 agreement, then mean |Δp|,
then accuracy: on a hundred validation images one image of accuracy is noise). When even that one
fails the serving gate (`models.artifact.variants.int8_gate`) on validation, no variant is written
(`Int8Skipped`, with the reason in `eval.json`). Otherwise the kept graph is compared with fp32 on the
test split (`eval.json` → `variants.int8`) and listed in the manifest (`variants.int8`), which is
what serving's precision choice reads. ONNX Runtime's own progress prints and per-tensor log lines go
to the debug logger `tuneserve.quantize.onnxruntime`; this module logs one line per method.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

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
from models.artifact.quantize_inputs import Images, Int8Skipped, QuantizeConfig, QuantizeData, QuantizeError
from models.artifact.quantize_graph import float_nodes
from models.artifact.variants import int8_gate

log = logging.getLogger("tuneserve.quantize")
chatter = logging.getLogger("tuneserve.quantize.onnxruntime")

QUANTIZED_OPS = ["Conv", "MatMul", "Gemm", "Add", "Mul", "Clip", "Relu", "MaxPool", "AveragePool",
                 "GlobalAveragePool", "Concat"]
# The first method whose variant passes the gate with this agreement on validation ends the search.
GOOD_ENOUGH_AGREEMENT = 0.995
OnMethod = Callable[[int, int, str], None]  # (methods done, methods in all, the one about to run)


# --------------------------------------------------------------------------- graph


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


class _ToChatter(logging.Filter):
    """ONNX Runtime's quantizer logs per-tensor notes on the root logger (`logging.info/warning`) and
    on its module loggers (`onnxruntime.quantization.*`): both become debug lines of `chatter`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "onnxruntime" not in record.pathname:
            return True
        chatter.debug("%s", record.getMessage())
        return False


class _ChatterHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        chatter.debug("%s", record.getMessage())


@contextlib.contextmanager
def quiet_onnxruntime():
    """Route ONNX Runtime's quantization chatter (stdout prints, log lines, session warnings) to the
    debug logger `chatter`: a run logs one line per method, and stdout stays the CLI's JSON."""
    import onnxruntime as ort

    printed, route, handler = io.StringIO(), _ToChatter(), _ChatterHandler()
    module_loggers = logging.getLogger("onnxruntime")
    propagate = module_loggers.propagate
    logging.getLogger().addFilter(route)
    module_loggers.addHandler(handler)
    module_loggers.propagate = False
    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        ort.set_default_logger_severity(2)
        module_loggers.propagate = propagate
        module_loggers.removeHandler(handler)
        logging.getLogger().removeFilter(route)
        for line in printed.getvalue().splitlines():
            if line.strip():
                chatter.debug("%s", line)


def prepare_graph(source: Path, workdir: Path) -> tuple[Path, list[str]]:
    """ONNX Runtime's recommended pre-processing (shape inference, basic fusions) with named nodes,
    once per version, and the nodes that stay float."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = workdir / "prepared.onnx"
    try:
        with quiet_onnxruntime():
            quant_pre_process(str(source), str(prepared))
        model = onnx.load(str(prepared))
    except Exception as error:  # noqa: BLE001 - pre-processing is an optimisation, not a requirement
        log.warning("quantization pre-processing failed (%s); quantizing the graph as exported", error)
        model = onnx.load(str(source))
    _named(model)
    onnx.save(model, str(prepared))
    return prepared, float_nodes(model.graph)


def quantize_graph(prepared: Path, target: Path, calibration: np.ndarray, method: str, config: QuantizeConfig,
                   excluded: list[str], input_name: str = "image") -> Path:
    """Write the static QDQ int8 version of the prepared graph to `target`, calibrated with `method`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    with quiet_onnxruntime():
        quantize_static(
            str(prepared), str(target), _batch_reader(input_name, calibration, config.batch_size),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=excluded,
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


def validation_gate(scores: dict[str, Any]) -> tuple[bool, str]:
    """The serving gate (`int8_gate`) applied to a method's validation scores: the accuracy drop on
    the labelled validation split, else the share of validation images whose top-1 changed."""
    delta = scores["accuracy"] - scores["fp32_accuracy"] if "accuracy" in scores else None
    passed, why = int8_gate(Variant(file=INT8_FILE, accuracy_delta=delta, agreement=scores["agreement"],
                                    max_probability_diff=scores["max_probability_diff"]))
    return passed, why.replace("test", "validation")


def _good_enough(scores: dict[str, Any]) -> bool:
    return scores["agreement"] >= GOOD_ENOUGH_AGREEMENT and validation_gate(scores)[0]


def _score_method(prepared: Path, target: Path, method: str, data: QuantizeData, manifest: Manifest,
                  config: QuantizeConfig, excluded: list[str], reference: np.ndarray) -> dict[str, Any]:
    """Quantize with `method` and score the variant against fp32 on the fidelity images; one log line."""
    started = time.monotonic()
    try:
        quantize_graph(prepared, target, data.calibration, method, config, excluded, manifest.input_name)
        probabilities = run_graph(target, data.fidelity_images(), manifest)
    except Exception as error:  # noqa: BLE001 - one calibrator failing leaves the others
        log.warning("int8 %s calibration failed: %s", method, error)
        return {"error": str(error)}
    scores: dict[str, Any] = {**agreement(reference, probabilities), "images": len(probabilities)}
    labels = data.validation.labels
    if labels is not None:
        scores["accuracy"] = float((probabilities[: len(labels)].argmax(1) == labels).mean())
        scores["fp32_accuracy"] = float((reference[: len(labels)].argmax(1) == labels).mean())
    scores["seconds"] = round(time.monotonic() - started, 1)
    log.info("int8 %s: top-1 agreement %.4f, mean |dp| %.5f on %d validation images%s, %.1f s", method,
             scores["agreement"], scores["mean_probability_diff"], len(probabilities),
             f", accuracy {scores['accuracy']:.4f} (fp32 {scores['fp32_accuracy']:.4f})" if labels is not None else "",
             scores["seconds"])
    return scores


def choose_calibration(source: Path, data: QuantizeData, manifest: Manifest, config: QuantizeConfig,
                       workdir: Path, on_method: OnMethod | None = None) -> tuple[str, Path, dict[str, dict[str, Any]]]:
    """Quantize with each method in order until one is good enough; keep the one closest to fp32.

    Accuracy is measured on the validation split; agreement and |Δp| on it and on the training
    images calibration did not use, which needs no labels and makes the ranking less noisy.
    `on_method(done, total, method)`: called before each method is tried (`done` methods so far).
    """
    prepared, excluded = prepare_graph(Path(source), workdir)
    reference = run_graph(source, data.fidelity_images(), manifest)
    tried: dict[str, dict[str, Any]] = {}
    for done, method in enumerate(config.methods):
        if on_method is not None:
            on_method(done, len(config.methods), method)
        tried[method] = _score_method(prepared, workdir / f"{method}.onnx", method, data, manifest, config,
                                      excluded, reference)
        if "error" not in tried[method] and _good_enough(tried[method]):
            break
    ranked = [m for m in tried if "error" not in tried[m]]
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


def _record_skip(directory: Path, reason: str, tried: dict[str, dict[str, Any]]) -> None:
    """No variant: the best calibration already fails the serving gate on validation, so `auto` would
    never serve it. eval.json says why; the manifest is left as it was."""
    report = read_eval(directory) or {}
    report.setdefault("variants", {})["int8"] = {"skipped": reason, "validation": tried}
    _write_atomically(directory / EVAL_FILE, json.dumps(report, indent=2).encode())
    log.info("int8 variant of %s skipped: %s", directory, reason)
    raise Int8Skipped(f"int8 variant skipped: {reason}")


def quantize_version(directory: str | Path, data: QuantizeData, config: QuantizeConfig = QuantizeConfig(),
                     on_method: OnMethod | None = None) -> Variant:
    """Write `model.int8.onnx` into a version's folder, its test comparison into `eval.json`
    (`variants.int8`) and the variant into `manifest.json`, in that order (the manifest last, so
    a reader that sees the variant finds its file). `on_method`: see `choose_calibration`."""
    config.validate()
    directory = Path(directory)
    manifest = read_manifest(directory)
    source = directory / ONNX_FILE
    with tempfile.TemporaryDirectory(prefix="tuneserve-int8-") as scratch:
        method, chosen, tried = choose_calibration(source, data, manifest, config, Path(scratch), on_method)
        passed, why = validation_gate(tried[method])
        if not passed:
            _record_skip(directory, f"{method} calibration: {why}", tried)
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
