"""Instant models: a head fitted on a stored model's frozen `embedding`, published in seconds.

Torch-free end to end (ONNX Runtime embeds, numpy/scikit-learn fit, `onnx` composes the graph),
so it runs in the service's room as well as the CLI's. The result is a normal version: the
source graph's body plus the new head in model.onnx, manifest with lineage, eval.json on the
test split, and the trust sections (temperature, thresholds, in-domain score) when there is a
validation split. It has no checkpoint.pt, so it cannot itself be the source of a torch fine-tune;
its source can.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.artifact import store
from models.data.datasets import Sample, check_readable, check_trainable, fingerprint, load_dataset, split_origins, split_samples
from models.errors import Cancelled, DatasetError, ManifestError
from models.data.evaluate import evaluate, run_samples
from models.transfer.head_graph import attach_head
from models.transfer.heads import LinearHead, fit_head
from models.artifact.manifest import EMBEDDING_OUTPUT, ONNX_FILE, DatasetInfo, Manifest, eval_summary, write_eval, write_manifest
from models.serving.runtime import OnnxClassifier, RuntimeOptions
from models.jobs.train_config import TrainConfig

log = logging.getLogger("tuneserve.instant")

PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 16


class _Silent:
    def phase(self, phase: str) -> None:  # noqa: D401 - the Progress interface, doing nothing
        pass


@dataclass
class InstantResult:
    version: store.ModelVersion
    report: dict[str, Any]
    head: LinearHead
    seconds: float
    embed_seconds: float
    fit_seconds: float

    def summary(self) -> dict[str, Any]:
        return {"model": self.version.tag, "strategy": self.head.strategy, "eval": eval_summary(self.report),
                "head": self.head.details, "seconds": round(self.seconds, 2),
                "embed_seconds": round(self.embed_seconds, 2), "fit_seconds": round(self.fit_seconds, 3)}


def load_source(ref: str, options: RuntimeOptions | None = None) -> OnnxClassifier:
    """A stored version whose graph gives its embedding, loaded; refuses older exports clearly."""
    version = store.resolve(ref)
    classifier = OnnxClassifier(version.path, version.name, version.version, options).load()
    classifier.require_embedding("an instant head or the advisor")
    return classifier


def embed_samples(classifier: OnnxClassifier, samples: list[Sample], labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings `[N, D]` and label indices `[N]`; any unreadable image fails the whole call, named."""
    name = classifier.require_embedding("embedding a dataset")
    outputs, kept, errors = run_samples(classifier, samples, [name])
    if errors:
        shown = "; ".join(f"{path}: {error}" for path, error in list(errors.items())[:10])
        raise DatasetError(f"{len(errors)} unreadable image(s): {shown}")
    index = {label: i for i, label in enumerate(labels)}
    return outputs[name], np.array([index[samples[i].label] for i in kept], dtype=np.int64)


def instant_splits(config: TrainConfig) -> tuple[dict[str, list[Sample]], list[str], DatasetInfo]:
    samples = load_dataset(config.data)
    check_trainable(samples, config.min_images_per_class)
    check_readable(samples)
    splits = split_samples(samples, config.val_fraction, config.test_fraction, config.seed)
    if not (splits["test"] or splits["val"]):
        raise DatasetError("an instant model needs held-out images to evaluate on: give a test split "
                           "(manifest `split` column) or at least 3 images per class")
    labels = sorted({s.label for s in samples})
    missing = sorted(set(labels) - {s.label for s in splits["train"]})
    if missing:
        raise DatasetError(f"no training images for labels {missing}")
    origins = split_origins(samples, splits)
    info = DatasetInfo(fingerprint=fingerprint(samples), num_train=len(splits["train"]), num_val=len(splits["val"]),
                       num_test=len(splits["test"]), source=str(config.data), splits_given=origins["given"],
                       splits_derived=origins["derived"])
    return splits, labels, info


def build_manifest(source: OnnxClassifier, labels: list[str], head: LinearHead, training: dict[str, Any],
                   dataset: DatasetInfo) -> Manifest:
    parent = source.manifest
    return Manifest(labels=labels, preprocessing=parent.preprocessing, backbone=parent.backbone, source=source.tag,
                    lineage=[*parent.lineage, source.tag], training=training, dataset=dataset, opset=parent.opset,
                    embedding_output=EMBEDDING_OUTPUT)


def write_graph(source: OnnxClassifier, head: LinearHead, staging: Path) -> None:
    import onnx

    graph = attach_head(onnx.load(str(source.directory / ONNX_FILE)), head, source.manifest.embedding_output)
    onnx.save(graph, str(staging / ONNX_FILE))


def parity_check(source: OnnxClassifier, staging: Path, head: LinearHead, samples: list[Sample]) -> float:
    """max |p_onnx − p_numpy| of the new graph against the numpy head on the source's embedding."""
    built = OnnxClassifier(staging, "instant", "staging", source.options).load()
    images = samples[:PARITY_IMAGES]
    outputs = run_samples(built, images, ["probabilities", EMBEDDING_OUTPUT])[0]
    probabilities, embedding = outputs["probabilities"], outputs[EMBEDDING_OUTPUT]
    reference = run_samples(source, images, [source.manifest.embedding_output])[0][source.manifest.embedding_output]
    diff = float(max(np.abs(probabilities - head.probabilities(reference)).max(), np.abs(embedding - reference).max()))
    if not np.isfinite(diff) or diff > PARITY_TOLERANCE:
        raise ManifestError(f"instant head parity failed: ONNX vs numpy max abs difference {diff:.3g} > {PARITY_TOLERANCE}")
    return diff


def _step(progress, stop: threading.Event | None, phase: str) -> None:
    if stop is not None and stop.is_set():
        raise Cancelled(f"cancelled before {phase}")
    progress.phase(phase)


def run_instant(config: TrainConfig, progress=None, stop: threading.Event | None = None,
                options: RuntimeOptions | None = None) -> InstantResult:
    """Fit `config.strategy` ('prototype' | 'logistic') on `config.source`'s embedding and publish it."""
    from models.serving.trust import calibrate_version

    started = time.monotonic()
    progress = progress or _Silent()
    config.validate()
    _step(progress, stop, "loading")
    source = load_source(config.source, options or RuntimeOptions(device=config.device))
    splits, labels, dataset = instant_splits(config)
    _step(progress, stop, "training")
    features, targets = embed_samples(source, splits["train"], labels)
    embedded = time.monotonic()
    head = fit_head(config.strategy, features, targets, len(labels))
    fitted = time.monotonic()
    _step(progress, stop, "exporting")
    staging = config.resolved_output_dir() / "export"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_graph(source, head, staging)
    test = splits["test"] or splits["val"]
    training = {**config.to_dict(), "head": head.details, "train_seconds": round(fitted - started, 2),
                "evaluated_on": "test" if splits["test"] else "val"}
    manifest = build_manifest(source, labels, head, training, dataset)
    write_manifest(manifest, staging)
    _step(progress, stop, "parity")
    write_manifest(manifest.model_copy(update={"parity_max_abs_diff": parity_check(source, staging, head, test)}), staging)
    if splits["val"]:
        _step(progress, stop, "calibrating")
        calibrate_version(staging, config.name, splits["train"], splits["val"], source.options)
    _step(progress, stop, "evaluating")
    report = evaluate(OnnxClassifier(staging, config.name, "staging", source.options).load(), test, top_k=config.top_k)
    write_eval(report, staging)
    _step(progress, stop, "publishing")
    version = store.publish(config.name, staging, {"fingerprint": dataset.fingerprint, "strategy": config.strategy})
    log.info("%s: %s head on %s, accuracy %.3f", version.tag, config.strategy, source.tag, report["accuracy"])
    return InstantResult(version, report, head, time.monotonic() - started, embedded - started, fitted - embedded)
