"""Evaluate a loaded model on labelled samples through the shared preprocessing."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import numpy as np

from models.data.datasets import Sample
from models.errors import DatasetError, ImageError
from models.data.metrics import compare_reports, evaluation_report, trust_report
from models.serving.preprocess import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, prepare, stack
from models.serving.runtime import OnnxClassifier


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def check_labels_known(samples: list[Sample], labels: list[str], model_tag: str) -> None:
    unknown = sorted({s.label for s in samples} - set(labels))
    if unknown:
        raise DatasetError(f"labels not known to model {model_tag}: {unknown}; it knows {len(labels)} labels")


def run_samples(
    model: OnnxClassifier,
    samples: list[Sample],
    outputs: list[str],
    batch_size: int = 64,
    workers: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: frozenset[str] = ALLOWED_FORMATS,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, np.ndarray], list[int], dict[str, str]]:
    """The named graph outputs for the readable samples, their indices, and an error per unreadable path.

    `on_batch(done, total)`: called after each batch with the samples done so far (readable or not)."""
    spec = model.manifest.preprocessing
    errors: dict[str, str] = {}
    rows: list[list[np.ndarray]] = []
    kept: list[int] = []

    def load(index: int):
        try:
            return index, prepare(samples[index].path, spec, max_pixels, allowed_formats), None
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
                rows.append(model.run(stack(arrays), outputs))
                kept.extend(indices)
            if on_batch is not None:
                on_batch(chunk[-1] + 1, len(samples))
    if not rows:
        return {name: np.zeros((0, model.manifest.num_classes), np.float32) for name in outputs}, kept, errors
    return {name: np.concatenate([row[i] for row in rows]) for i, name in enumerate(outputs)}, kept, errors


def predict_samples(model: OnnxClassifier, samples: list[Sample], batch_size: int = 64, workers: int = 2,
                    max_pixels: int = DEFAULT_MAX_PIXELS, allowed_formats: frozenset[str] = ALLOWED_FORMATS,
                    ) -> tuple[np.ndarray, list[int], dict[str, str]]:
    """Probabilities for the readable samples, their indices, and an error per unreadable path."""
    name = model.manifest.output_names[1]
    out, kept, errors = run_samples(model, samples, [name], batch_size, workers, max_pixels, allowed_formats)
    return out[name], kept, errors


def evaluate(
    model: OnnxClassifier,
    samples: list[Sample],
    top_k: int = 5,
    batch_size: int = 64,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: frozenset[str] = ALLOWED_FORMATS,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The `eval.json` report for `model` on labelled `samples`; unreadable images are listed.
    `on_batch(done, total)` follows the pass over the images (run_samples)."""
    labels = model.manifest.labels
    check_labels_known(samples, labels, model.tag)
    logits_name, probabilities_name = model.manifest.output_names
    names = [logits_name, probabilities_name] + ([model.manifest.embedding_output] if model.ood is not None else [])
    outputs, kept, errors = run_samples(
        model, samples, names, batch_size, max_pixels=max_pixels, allowed_formats=allowed_formats, on_batch=on_batch
    )
    probabilities = outputs[probabilities_name]
    if not kept:
        raise DatasetError(f"none of the {len(samples)} images could be read; first errors: {dict(list(errors.items())[:3])}")
    index = {label: i for i, label in enumerate(labels)}
    y_true = [index[samples[i].label] for i in kept]
    present = sorted({samples[i].label for i in kept}, key=index.get)
    report = evaluation_report(y_true, probabilities, labels, top_k=top_k)
    in_domain = model.ood.score(outputs[names[2]]) if model.ood is not None else None
    report.update(trust_report(outputs[logits_name], probabilities, y_true, model.manifest, in_domain))
    report["model"] = model.tag
    report["variant"] = model.variant  # the precision that produced these numbers
    report["labels_evaluated"] = present
    report["unreadable"] = errors
    return report


def evaluate_compare(
    model: OnnxClassifier,
    other: OnnxClassifier,
    samples: list[Sample],
    top_k: int = 5,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: frozenset[str] = ALLOWED_FORMATS,
) -> dict[str, Any]:
    """`model` on all samples, and both models on the samples whose labels `other` also knows.

    A source model often has other labels than its fine-tuned target (ImageNet vs a defect
    taxonomy); the comparison is then made on the shared labels only, and says so. `difference`
    is model minus other, on those same images.
    """
    limits = {"max_pixels": max_pixels, "allowed_formats": allowed_formats}
    report = evaluate(model, samples, top_k, **limits)
    known = set(other.manifest.labels)
    shared = [s for s in samples if s.label in known]
    if not shared:
        present = sorted({s.label for s in samples})
        raise DatasetError(
            f"cannot compare with {other.tag}: it knows none of the dataset's labels {present[:20]}; "
            "compare models that share labels, e.g. two versions of one model"
        )
    same_images = report if len(shared) == len(samples) else evaluate(model, shared, top_k, **limits)
    baseline = evaluate(other, shared, top_k, **limits)
    compared_on = {"samples": len(shared), "labels": sorted({s.label for s in shared})}
    return {
        **report,
        "compare_with": baseline,
        "compared_on": compared_on,
        "difference": compare_reports(baseline, same_images),
    }
