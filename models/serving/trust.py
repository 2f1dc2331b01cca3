"""Fit, at export, what makes a version's answers trustworthy, and report it in eval.json (the report itself: models/data/metrics.py).

Torch-free: it works on the exported graph through the same runtime and preprocessing as
serving, so what is fitted is exactly what is served. Training calls `calibrate_version` on the
staging folder after the parity gate and before evaluation:
1. val logits → temperature T (min NLL), baked into model.onnx: probabilities = softmax(logits / T);
   where the head was fitted on val too, training passes val logits from heads that never saw the
   row (training/crossfit.py) instead of the graph's own;
2. val probabilities at T → the best-F1 threshold of each label (and the drift reference's predictions);
3. train embeddings → class means and shared covariance; val embeddings → the in-domain scale. At
   most `OOD_TRAIN_IMAGES` train images, each class in its share: a 1,280-wide covariance is settled
   long before 51,000 images; the full set made calibration of the 60k job 180 s, the sample 66 s.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.serving import calibration as cal
from models.data.datasets import Sample
from models.errors import ManifestError
from models.data.evaluate import run_samples
from models.artifact.manifest import ONNX_FILE, Calibration, Manifest, OodSection, write_manifest
from models.serving.ood import OodModel, fit_ood
from models.artifact.reference import Reference, build_reference
from models.serving.preprocess import prepare, stack
from models.serving.runtime import OnnxClassifier, RuntimeOptions

log = logging.getLogger("tuneserve.trust")

BAKE_TOLERANCE = 1e-5
OOD_TRAIN_IMAGES = 10_000


@dataclass
class TrustFit:
    temperature: float
    thresholds: dict[str, float]
    ood: OodModel | None
    val_samples: int
    train_samples: int
    reference: Reference | None = None  # what served traffic should look like (drift monitoring)
    fitted_on: str = "val"


def _indices(samples: list[Sample], kept: list[int], labels: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index[samples[i].label] for i in kept], dtype=np.int64)


def ood_sample(train: list[Sample], limit: int = OOD_TRAIN_IMAGES) -> list[Sample]:
    """Up to `limit` of `train`, every class in its share (evenly spaced within it, in order: no RNG)."""
    if len(train) <= limit:
        return train
    by_label: dict[str, list[Sample]] = {}
    for sample in train:
        by_label.setdefault(sample.label, []).append(sample)
    kept = []
    for members in by_label.values():
        count = max(1, round(limit * len(members) / len(train)))
        kept += [members[i] for i in np.linspace(0, len(members) - 1, count).round().astype(int)]
    return kept


def fit_trust(classifier: OnnxClassifier, train: list[Sample], val: list[Sample],
              val_logits: np.ndarray | None = None, on_images=None) -> TrustFit:
    """Temperature and thresholds from `val`; the in-domain score from `train` (+ `val` for its scale).

    `val_logits` (one row per `val` sample), when given, replace the graph's own val logits: training
    passes them when the published head was fitted on val (logits from heads that never saw the row).
    `on_images(done, total)`: after each batch, over the val and (sampled) train images together."""
    manifest = classifier.manifest
    embedding = manifest.embedding_output if classifier.has_embedding else None
    logits_name = manifest.output_names[0]
    train = ood_sample(train) if embedding else []
    total = len(val) + len(train)
    report = (lambda offset: (lambda done, _total: on_images(offset + done, total))) if on_images else (lambda _: None)
    val_out, val_kept, _ = run_samples(classifier, val, [logits_name] + ([embedding] if embedding else []),
                                       on_batch=report(0))
    y_val = _indices(val, val_kept, manifest.labels)
    logits = val_out[logits_name] if val_logits is None else np.asarray(val_logits, dtype=np.float64)[val_kept]
    temperature = cal.fit_temperature(logits, y_val)
    if not cal.TEMPERATURE_BOUNDS[0] * 1.01 < temperature < cal.TEMPERATURE_BOUNDS[1] / 1.01:
        log.warning("%s: temperature %.3g is at the edge of %s: the model is far from calibrated (undertrained?)",
                    classifier.tag, temperature, cal.TEMPERATURE_BOUNDS)
    probabilities = cal.softmax(logits, temperature)
    thresholds = dict(zip(manifest.labels, cal.best_f1_thresholds(probabilities, y_val)))
    ood = None
    train_count = 0
    if embedding:
        train_out, train_kept, _ = run_samples(classifier, train, [embedding], on_batch=report(len(val)))
        train_count = len(train_kept)
        ood = fit_ood(train_out[embedding], _indices(train, train_kept, manifest.labels), val_out[embedding],
                      manifest.num_classes)
    log.info("%s: temperature %.3f from %d val images; in-domain score %s", classifier.tag, temperature,
             len(val_kept), f"from {train_count} train images" if ood else "unavailable (no embedding output)")
    reference = build_reference(val_out[embedding], y_val, probabilities.argmax(1), manifest.labels) if embedding else None
    return TrustFit(temperature, thresholds, ood, len(val_kept), train_count, reference,
                    "val" if val_logits is None else "val, cross-fitted")


def apply_trust(directory: str | Path, fit: TrustFit, manifest: Manifest) -> Manifest:
    """Bake T into model.onnx, write ood.npz, and record the sections in manifest.json."""
    import onnx

    directory = Path(directory)
    graph = onnx.load(str(directory / ONNX_FILE))
    cal.bake_temperature(graph, fit.temperature, *manifest.output_names)
    onnx.save(graph, str(directory / ONNX_FILE))
    ood = None
    if fit.reference is not None:
        fit.reference.save(directory)
    if fit.ood is not None:
        fit.ood.save(directory)
        ood = OodSection(**fit.ood.section(train=fit.train_samples, val=fit.val_samples))
    updated = manifest.model_copy(update={
        "calibration": Calibration(temperature=fit.temperature, fitted_on=fit.fitted_on, samples=fit.val_samples),
        "thresholds": fit.thresholds,
        "ood": ood,
    })
    write_manifest(updated, directory)
    return updated


def check_baked(classifier: OnnxClassifier, images: np.ndarray) -> float:
    """max |probabilities - softmax(logits / T)| of the baked graph; raises above BAKE_TOLERANCE."""
    logits, probabilities = classifier.run(images, list(classifier.manifest.output_names))
    diff = float(np.abs(probabilities - cal.softmax(logits, classifier.manifest.temperature)).max())
    if not diff <= BAKE_TOLERANCE:
        raise ManifestError(f"{classifier.tag}: baked temperature does not match the manifest (max diff {diff:.3g})")
    return diff


def calibrate_version(directory: str | Path, name: str, train: list[Sample], val: list[Sample],
                      options: RuntimeOptions | None = None, val_logits: np.ndarray | None = None,
                      on_images=None) -> Manifest:
    """Fit and apply the trust sections to an exported version folder (see the module docstring);
    `val_logits`, `on_images`: see `fit_trust`."""
    classifier = OnnxClassifier(directory, name, "staging", options).load()
    if not val:
        log.warning("%s: no validation images; served uncalibrated (T = 1, no thresholds)", name)
        return classifier.manifest
    manifest = apply_trust(directory, fit_trust(classifier, train, val, val_logits, on_images), classifier.manifest)
    baked = OnnxClassifier(directory, name, "staging", options).load()
    check_baked(baked, stack([prepare(s.path, manifest.preprocessing) for s in val[:8]]))
    return manifest
