"""ONNX export, checker, parity gate, evaluation of the exported graph, then publish.

Nothing reaches the store unless every gate passes.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.artifact import store
from models.data.datasets import Sample
from models.errors import TuneserveError
from models.data.evaluate import evaluate
from models.artifact.manifest import (CHECKPOINT_FILE, EMBEDDING_OUTPUT, EVIDENCE_OUTPUT, ONNX_FILE, DatasetInfo,
                                      EvidenceSection, Manifest, write_eval, write_manifest)
from models.serving.preprocess import prepare, stack
from models.serving.runtime import OnnxClassifier, RuntimeOptions
from training.backbones import Built, ImageModel, checkpoint_payload
from training.progress import Progress, StageMeter

log = logging.getLogger("tuneserve.export")
for _noisy in ("onnx_ir", "onnxscript"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)

PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 16
EMBEDDING_TOLERANCE = 1e-3  # max |e_onnx - e_torch| / max(1, max |e_torch|)


class ExportError(TuneserveError):
    status = 500


OUTPUTS = ["logits", "probabilities", EMBEDDING_OUTPUT]


def export_onnx(model: torch.nn.Module, path: str | Path, size: int, outputs: list[str] = OUTPUTS) -> int:
    """uint8 NHWC `image` → `outputs` (`logits`, `probabilities`, `embedding`, maybe `evidence`); dynamic
    batch, one self-contained file.

    Returns the opset.
    """
    import onnx

    model = model.cpu().eval()  # eval first: the dynamo exporter would otherwise run a training forward
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["image"],
        output_names=outputs,
        dynamic_shapes={"image": {0: batch}},
        external_data=False,
        dynamo=True,
        verbose=False,
    )
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    inputs = [i.name for i in graph.graph.input]
    got = [o.name for o in graph.graph.output]
    if inputs != ["image"] or got != outputs:
        raise ExportError(f"exported graph has inputs {inputs} and outputs {got}; expected ['image'] and {outputs}")
    return next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), 0)


def parity_check(model: ImageModel, onnx_path: str | Path, images: np.ndarray, tolerance: float = PARITY_TOLERANCE) -> float:
    """Max |p_onnx - p_torch| over `images` (uint8 NHWC); raises ExportError above `tolerance`.

    The embedding is gated too, relative to its scale (features are not bounded like probabilities).
    """
    import onnxruntime as ort

    model = model.cpu().eval()
    with torch.no_grad():
        _, probabilities, embedding = (t.numpy() for t in model(torch.from_numpy(images)))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got, got_embedding = session.run(["probabilities", EMBEDDING_OUTPUT], {"image": images})
    # a batch of one as well: the dynamic axis must really be dynamic
    single = session.run(["probabilities"], {"image": images[:1]})[0]
    diff = float(max(np.abs(got - probabilities).max(), np.abs(single - probabilities[:1]).max()))
    if not np.isfinite(diff) or diff > tolerance:
        raise ExportError(f"parity check failed: ONNX Runtime vs torch max abs difference of probabilities {diff:.3g} > {tolerance}")
    scale = max(1.0, float(np.abs(embedding).max()))
    embedding_diff = float(np.abs(got_embedding - embedding).max()) / scale
    if not np.isfinite(embedding_diff) or embedding_diff > EMBEDDING_TOLERANCE:
        raise ExportError(f"parity check failed: ONNX Runtime vs torch relative difference of the embedding "
                          f"{embedding_diff:.3g} > {EMBEDDING_TOLERANCE}")
    return diff


def onnx_evidence_error(onnx_path: str | Path, images: np.ndarray, bias: np.ndarray) -> float:
    """The evidence check on the exported graph, as ONNX Runtime computes it."""
    import onnxruntime as ort

    from training.evidence import evidence_error

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits, evidence = session.run(["logits", EVIDENCE_OUTPUT], {"image": images})
    return evidence_error(logits, evidence, bias)


def export_explained(built: Built, onnx_path: Path, images: np.ndarray) -> tuple[int, EvidenceSection]:
    """Export with an `evidence` output where the head is linear over pooled maps and the exported maps
    sum to logit − bias (training/evidence.py); otherwise without it, saying why. Returns (opset, section)."""
    from training.evidence import EVIDENCE_TOLERANCE, explained

    size = built.preprocessing.size
    model, reason = explained(built.model, size, images)
    if model is not None:
        opset = export_onnx(model, onnx_path, size, [*OUTPUTS, EVIDENCE_OUTPUT])
        error = onnx_evidence_error(onnx_path, images, model.evidence.bias.numpy())
        if np.isfinite(error) and error <= EVIDENCE_TOLERANCE:
            log.info("evidence: maps sum to logit - bias within %.1e (relative)", error)
            return opset, EvidenceSection(available=True, output=EVIDENCE_OUTPUT, side=model.evidence.side, max_error=error)
        reason = f"the exported evidence maps do not sum to the logits (relative error {error:.2g})"
    log.info("no evidence output: %s", reason)
    return export_onnx(built.model, onnx_path, size), EvidenceSection(available=False, reason=reason)


def held_out_images(samples: list[Sample], spec, limit: int = PARITY_IMAGES) -> np.ndarray:
    return stack([prepare(s.path, spec) for s in samples[:limit]])


def build_manifest(built: Built, labels: list[str], config: dict[str, Any], dataset: DatasetInfo | None,
                   opset: int | None, parity: float | None) -> Manifest:
    return Manifest(
        labels=labels,
        preprocessing=built.preprocessing,
        backbone=built.backbone,
        source=built.source,
        lineage=built.lineage,
        training=config,
        dataset=dataset,
        opset=opset,
        parity_max_abs_diff=parity,
        embedding_output=EMBEDDING_OUTPUT,
        recipe=config.get("recipe"),
    )


def export_model(built: Built, labels: list[str], staging: str | Path, parity_images: np.ndarray,
                 training: dict[str, Any], dataset: DatasetInfo | None, progress: Progress | None = None,
                 checkpoint: Built | None = None) -> Manifest:
    """Write model.onnx (checked, parity-gated), manifest.json and checkpoint.pt into `staging`.

    `checkpoint`: the torch model a later fine-tune starts from, when it is not the exported one (a
    multi-depth head's graph holds the frozen backbone; its checkpoint is that backbone with a head
    on the last layer, so any strategy can continue from it).
    """
    progress = progress or Progress()
    staging = Path(staging)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    progress.phase("exporting")
    # stage "export": 0/3 → the ONNX graph written and checked → parity passed → manifest and checkpoint saved
    step = StageMeter(progress, "export", 3, every_s=0.0, unit="steps")
    step(0, part="onnx")
    onnx_path = staging / ONNX_FILE
    opset, evidence = export_explained(built, onnx_path, parity_images)
    progress.phase("parity")
    step(1, part="parity")
    diff = parity_check(built.model, onnx_path, parity_images)
    log.info("parity: max abs difference of probabilities %.2e", diff)
    step(2, part="checkpoint")
    manifest = build_manifest(built, labels, training, dataset, opset, diff).model_copy(update={"evidence": evidence})
    write_manifest(manifest, staging)
    torch.save(checkpoint_payload(checkpoint or built, labels), staging / CHECKPOINT_FILE)
    step(3)
    return manifest


def evaluate_export(staging: str | Path, name: str, test_samples: list[Sample], top_k: int, device: str = "auto",
                    progress: Progress | None = None) -> tuple[dict[str, Any], float]:
    """Evaluate the exported graph (through `models/` preprocessing and runtime) → eval.json, and the
    seconds per image it took (decode and inference, not the session's load: what INT8 is planned from);
    stage "evaluation" counts the test images through it, batch by batch."""
    progress = progress or Progress()
    progress.phase("evaluating")
    classifier = OnnxClassifier(staging, name, "staging", RuntimeOptions(device=device)).load()
    images = StageMeter(progress, "evaluation", len(test_samples), unit="images")
    images(0)
    started = time.monotonic()
    report = evaluate(classifier, test_samples, top_k=top_k,  # k is capped at the number of classes there
                      on_batch=lambda done, _total: images(done))
    per_image_s = (time.monotonic() - started) / max(len(test_samples), 1)
    if report.get("unreadable"):
        raise ExportError(f"unreadable test images: {report['unreadable']}")
    write_eval(report, staging)
    return report, per_image_s


def quantize_export(staging: str | Path, splits: dict[str, list[Sample]], progress: Progress | None = None,
                    time_left_s: float | None = None, per_image_s: float = 0.0) -> dict[str, Any]:
    """Add the static INT8 variant to the staged version; returns the updated eval.json.

    An int8 variant is optional: when it cannot pass the serving gate on validation it is skipped
    (`variants.int8.skipped`, written by the quantizer); so it is when the job's budget leaves
    `time_left_s` and the run would take longer (planned from `per_image_s`, an fp32 pass's cost per
    image: the budget is a hard cap); and when quantization fails the version is published fp32-only
    with the error (`variants.int8.error`). Stage "int8" counts the calibration methods tried
    (`method`: the one running); it ends at total/total when the search stops early.
    """
    from models.artifact.manifest import read_eval, read_manifest
    from models.artifact.quantize import quantize_version
    from models.artifact.quantize_inputs import Int8Skipped, QuantizeConfig, data_from_splits

    progress = progress or Progress()
    progress.phase("quantizing")
    config = QuantizeConfig()
    methods = StageMeter(progress, "int8", len(config.methods), every_s=0.0, unit="methods")
    estimate = config.estimate_s(per_image_s, *(len(splits[name]) for name in ("train", "val", "test")))
    if time_left_s is not None and estimate > time_left_s:
        reason = (f"the budget leaves {max(time_left_s, 0.0):.0f}s and the int8 step needs about {estimate:.0f}s; "
                  f"`tuneserve quantize NAME:VERSION` makes one later")
        log.info("int8 variant skipped: %s", reason)
        return _note_int8(staging, {"skipped": reason, "estimate_s": round(estimate, 1)}, methods)
    try:
        quantize_version(staging, data_from_splits(splits, read_manifest(staging), config), config,
                         on_method=lambda done, _total, method: methods(done, method=method))
    except Int8Skipped:
        pass  # the quantizer logged the one line and recorded the reason
    except Exception as error:  # noqa: BLE001 - fp32 is still a complete, checked version
        log.warning("int8 variant not written: %s", error)
        return _note_int8(staging, {"error": f"{type(error).__name__}: {error}"}, methods)
    methods(methods.total)
    return read_eval(staging) or {}


def _note_int8(staging: str | Path, entry: dict[str, Any], methods: StageMeter) -> dict[str, Any]:
    """eval.json's `variants.int8` says why there is no variant; the stage ends."""
    from models.artifact.manifest import read_eval

    report = read_eval(staging) or {}
    report.setdefault("variants", {})["int8"] = entry
    write_eval(report, staging)
    methods(methods.total)
    return report


def publish(name: str, staging: str | Path, metadata: dict[str, Any] | None = None,
            progress: Progress | None = None, stop: threading.Event | None = None) -> store.ModelVersion:
    progress = progress or Progress()
    if stop is not None and stop.is_set():
        from training.train import Cancelled

        raise Cancelled("cancelled before publishing")
    progress.phase("publishing")
    return store.publish(name, staging, metadata)
