"""The evaluation report (`eval.json`), computed with scikit-learn."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

from models.serving import calibration as cal
from models.artifact.manifest import Manifest


def evaluation_report(
    y_true: Sequence[int],
    probabilities: np.ndarray,
    labels: Sequence[str],
    top_k: int = 5,
) -> dict[str, Any]:
    """Accuracy, top-k, per-class P/R/F1/support, macro and weighted averages, confusion matrix.

    `y_true` indexes `labels`; `probabilities` is `[N, len(labels)]` in the same order.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if len(y_true) == 0:
        raise ValueError("cannot evaluate on zero samples")
    class_ids = np.arange(len(labels))
    y_pred = probabilities.argmax(axis=1)
    k = min(top_k, len(labels))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=class_ids, zero_division=0
    )
    report: dict[str, Any] = {
        "samples": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "top_k": k,
        "top_k_accuracy": float(
            top_k_accuracy_score(y_true, probabilities, k=k, labels=class_ids) if len(labels) > 2 else accuracy_score(y_true, y_pred)
        ),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
    }
    present = support > 0
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=class_ids[present], average=average, zero_division=0
        )
        report[f"{average}_avg"] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    report["confusion_matrix"] = {
        "labels": list(labels),
        "matrix": confusion_matrix(y_true, y_pred, labels=class_ids).tolist(),
    }
    return report


def compare_reports(base: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    """`other - base` on the headline metrics."""
    diff = {key: other[key] - base[key] for key in ("accuracy", "top_k_accuracy") if key in base and key in other}
    for average in ("macro_avg", "weighted_avg"):
        if average in base and average in other:
            diff[f"{average.split('_')[0]}_f1"] = other[average]["f1"] - base[average]["f1"]
    return diff


def trust_report(logits: np.ndarray, probabilities: np.ndarray, y_true: Sequence[int], manifest: Manifest,
                 in_domain: np.ndarray | None) -> dict[str, Any]:
    """eval.json's calibration (before/after T), risk–coverage, `auto` coverage and in-domain share."""
    y_true = np.asarray(y_true, dtype=np.int64)
    report: dict[str, Any] = {
        "calibration": {
            "temperature": manifest.temperature,
            "before": cal.calibration_metrics(cal.softmax(logits), y_true),
            "after": cal.calibration_metrics(probabilities, y_true),
        },
        "risk_coverage": cal.risk_coverage(probabilities, y_true),
    }
    in_domain_ok = None
    if in_domain is not None and manifest.ood is not None:
        in_domain_ok = np.asarray(in_domain) >= manifest.ood.threshold
        report["in_domain"] = {"threshold": manifest.ood.threshold, "share_in_domain": float(in_domain_ok.mean())}
    if manifest.thresholds is not None:
        cuts = [manifest.thresholds.get(label, cal.DEFAULT_THRESHOLD) for label in manifest.labels]
        confident = cal.answered_at(probabilities, cuts)
        answered = confident & in_domain_ok if in_domain_ok is not None else confident
        report["auto"] = {**cal.selective(probabilities, y_true, answered),
                          "confidence_only": cal.selective(probabilities, y_true, confident)}
    return report
