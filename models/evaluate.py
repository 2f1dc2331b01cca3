"""Evaluate a loaded model on labelled samples through the shared preprocessing."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import numpy as np

from models.datasets import Sample
from models.errors import DatasetError, ImageError
from models.metrics import compare_reports, evaluation_report
from models.preprocess import DEFAULT_MAX_PIXELS, prepare, stack
from models.runtime import OnnxClassifier


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def check_labels_known(samples: list[Sample], labels: list[str], model_tag: str) -> None:
    unknown = sorted({s.label for s in samples} - set(labels))
    if unknown:
        raise DatasetError(f"labels not known to model {model_tag}: {unknown}; it knows {len(labels)} labels")


def predict_samples(
    model: OnnxClassifier,
    samples: list[Sample],
    batch_size: int = 64,
    workers: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[int], dict[str, str]]:
    """Probabilities for the readable samples, their indices, and an error per unreadable path."""
    spec = model.manifest.preprocessing
    errors: dict[str, str] = {}
    rows: list[np.ndarray] = []
    kept: list[int] = []

    def load(index: int):
        try:
            return index, prepare(samples[index].path, spec, max_pixels), None
        except (ImageError, OSError) as error:
            return index, None, str(error)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for chunk in _batches(list(range(len(samples))), batch_size):
            arrays, indices = [], []
            for index, array, error in pool.map(load, chunk):
                if error is not None:
                    errors[str(samples[index].path)] = error
                else:
                    arrays.append(array)
                    indices.append(index)
            if arrays:
                rows.append(model.predict(stack(arrays)))
                kept.extend(indices)
            if on_batch:
                on_batch(len(chunk))
    probabilities = np.concatenate(rows) if rows else np.zeros((0, model.manifest.num_classes), np.float32)
    return probabilities, kept, errors


def evaluate(
    model: OnnxClassifier,
    samples: list[Sample],
    top_k: int = 5,
    batch_size: int = 64,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """The `eval.json` report for `model` on labelled `samples`; unreadable images are listed."""
    labels = model.manifest.labels
    check_labels_known(samples, labels, model.tag)
    probabilities, kept, errors = predict_samples(model, samples, batch_size, max_pixels=max_pixels)
    if not kept:
        raise DatasetError(f"none of the {len(samples)} images could be read; first errors: {dict(list(errors.items())[:3])}")
    index = {label: i for i, label in enumerate(labels)}
    y_true = [index[samples[i].label] for i in kept]
    present = sorted({samples[i].label for i in kept}, key=index.get)
    report = evaluation_report(y_true, probabilities, labels, top_k=top_k)
    report["model"] = model.tag
    report["labels_evaluated"] = present
    report["unreadable"] = errors
    return report


def evaluate_compare(
    model: OnnxClassifier, other: OnnxClassifier, samples: list[Sample], top_k: int = 5
) -> dict[str, Any]:
    """Both models on the same samples; `difference` is model minus other."""
    report = evaluate(model, samples, top_k)
    baseline = evaluate(other, samples, top_k)
    return {**report, "compare_with": baseline, "difference": compare_reports(baseline, report)}
