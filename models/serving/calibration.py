"""How far a model's probabilities can be trusted, and the per-label cut-offs to act on them.

Torch-free (numpy, scipy): export fits the temperature and thresholds on the validation split;
`eval.json` and the HTML report read the same numbers back.

- Temperature scaling (Guo et al. 2017): one scalar `T`, `p = softmax(logits / T)`, chosen to
  minimise the negative log-likelihood of the validation labels. It never changes the argmax, so
  accuracy is untouched; only the confidence moves.
- ECE uses 15 equal-width confidence bins (the paper's setting), weighted by bin size.
- Per-label thresholds: the best-F1 cut-off of each label (AWS Rekognition's "assumed
  threshold"): a prediction of label c counts only when its probability reaches threshold[c].
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

ECE_BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)
# A label that was never predicted on validation has no evidence for a cut-off; 0.5 answers only
# when the model favours it over all the others together.
DEFAULT_THRESHOLD = 0.5
RISK_COVERAGE_THRESHOLDS = tuple(sorted({round(float(t), 2) for t in np.linspace(0.0, 1.0, 21)} | {0.99, 0.999}))


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length: the in-domain score and the prototype head compare directions."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def _log_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    return scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))


def nll_of_logits(logits: np.ndarray, labels: Sequence[int], temperature: float = 1.0) -> float:
    labels = np.asarray(labels, dtype=np.int64)
    return float(-_log_softmax(logits, temperature)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: Sequence[int], bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The T in `bounds` minimising the NLL of `labels` under softmax(logits / T).

    The NLL is convex in 1/T, so a bounded scalar search on log T finds the global minimum. When
    every argmax is right the NLL has no minimum (it falls as T → 0, towards probabilities of
    exactly 1): a validation set without one error gives no evidence for sharpening, so T stays 1.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    if len(logits) == 0 or (logits.argmax(axis=1) == np.asarray(labels)).all():
        return 1.0
    low, high = np.log(bounds[0]), np.log(bounds[1])
    result = minimize_scalar(lambda log_t: nll_of_logits(logits, labels, float(np.exp(log_t))),
                             bounds=(low, high), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


def nll(probabilities: np.ndarray, labels: Sequence[int], eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true labels (natural log)."""
    labels = np.asarray(labels, dtype=np.int64)
    picked = np.asarray(probabilities, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, eps, 1.0)).mean())


def brier(probabilities: np.ndarray, labels: Sequence[int]) -> float:
    """Multi-class Brier score: mean over samples of sum_k (p_k - y_k)^2 (0 best, 2 worst)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    onehot = np.zeros_like(probabilities)
    onehot[np.arange(len(probabilities)), np.asarray(labels, dtype=np.int64)] = 1.0
    return float(((probabilities - onehot) ** 2).sum(axis=1).mean())


def reliability_bins(probabilities: np.ndarray, labels: Sequence[int], bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Equal-width bins of the top-1 confidence: count, mean confidence and accuracy in each.

    Bin i holds confidences in (i/bins, (i+1)/bins]; the first bin also holds exactly 0.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels, dtype=np.int64)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    out = []
    for i in range(bins):
        members = index == i
        count = int(members.sum())
        out.append({
            "lower": i / bins,
            "upper": (i + 1) / bins,
            "count": count,
            "confidence": float(confidence[members].mean()) if count else None,
            "accuracy": float(correct[members].mean()) if count else None,
        })
    return out


def ece(probabilities: np.ndarray, labels: Sequence[int], bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of |accuracy - confidence| weighted by bin share."""
    table = reliability_bins(probabilities, labels, bins)
    total = sum(b["count"] for b in table)
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"]))


def calibration_metrics(probabilities: np.ndarray, labels: Sequence[int]) -> dict[str, Any]:
    return {
        "ece": ece(probabilities, labels),
        "nll": nll(probabilities, labels),
        "brier": brier(probabilities, labels),
        "reliability": reliability_bins(probabilities, labels),
    }


# ---- per-label thresholds and selective prediction ------------------------------------------


def best_f1_threshold(confidence: np.ndarray, is_true: np.ndarray, positives: int) -> float:
    """Cut-off on the confidences of one label's predictions that maximises that label's F1.

    `confidence`: probabilities of the samples predicted as the label; `is_true`: whether each
    is really that label; `positives`: how many samples truly have the label. Keeping the top j
    predictions gives F1 = 2 TP / (j + positives). Ties favour the lowest cut-off (most answers).
    """
    if len(confidence) == 0:
        return DEFAULT_THRESHOLD
    order = np.argsort(-confidence, kind="stable")
    sorted_conf = confidence[order]
    true_positives = np.cumsum(is_true[order])
    kept = np.arange(1, len(order) + 1)
    f1 = 2 * true_positives / (kept + positives)
    # a cut-off between two equal confidences cannot keep one and drop the other
    valid = np.append(sorted_conf[1:] < sorted_conf[:-1], True)
    f1 = np.where(valid, f1, -1.0)
    if f1.max() <= 0:  # every prediction of this label was wrong: answer none of them
        return float(min(1.0, np.nextafter(sorted_conf[0], 2.0)))
    best = np.flatnonzero(f1 == f1.max())[-1]
    return float(sorted_conf[best])


def best_f1_thresholds(probabilities: np.ndarray, labels: Sequence[int]) -> list[float]:
    """The best-F1 threshold of each label (index order), from top-1 predictions on validation."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    out = []
    for c in range(probabilities.shape[1]):
        mine = predicted == c
        out.append(best_f1_threshold(confidence[mine], labels[mine] == c, int((labels == c).sum())))
    return out


def selective(probabilities: np.ndarray, labels: Sequence[int], answered: np.ndarray) -> dict[str, Any]:
    """Coverage (share answered) and accuracy of the answered ones (None when none are)."""
    correct = np.asarray(probabilities).argmax(axis=1) == np.asarray(labels, dtype=np.int64)
    count = int(answered.sum())
    return {
        "coverage": count / len(answered) if len(answered) else 0.0,
        "accuracy": float(correct[answered].mean()) if count else None,
        "answered": count,
    }


def answered_at(probabilities: np.ndarray, thresholds: Sequence[float] | float) -> np.ndarray:
    """Which rows clear the cut-off of their top label (one number, or one per label)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    cut = np.asarray(thresholds, dtype=np.float64)
    needed = cut[probabilities.argmax(axis=1)] if cut.ndim else cut
    return probabilities.max(axis=1) >= needed


def risk_coverage(probabilities: np.ndarray, labels: Sequence[int],
                  thresholds: Sequence[float] = RISK_COVERAGE_THRESHOLDS) -> list[dict[str, Any]]:
    """Coverage and selective accuracy at each global `min_confidence` threshold."""
    return [{"threshold": float(t), **selective(probabilities, labels, answered_at(probabilities, t))}
            for t in thresholds]


# ---- the temperature inside the graph --------------------------------------------------------

TEMPERATURE_INITIALIZER = "calibration_temperature"


def _prune_dead_nodes(graph) -> None:
    """Drop nodes whose outputs nothing reads (the uncalibrated softmax after re-wiring)."""
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def bake_temperature(model, temperature: float, logits: str = "logits", probabilities: str = "probabilities"):
    """Re-wire an ONNX model so that `probabilities = softmax(logits / temperature)`; `logits` unchanged.

    Works on any graph with those two outputs, whatever computed `probabilities` before; baking
    again replaces the earlier temperature. Returns the same (modified) `onnx.ModelProto`.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    value = numpy_helper.from_array(np.array(temperature, dtype=np.float32), TEMPERATURE_INITIALIZER)
    for index, existing in enumerate(graph.initializer):
        if existing.name == TEMPERATURE_INITIALIZER:
            graph.initializer[index].CopyFrom(value)
            return model
    for node in graph.node:
        node.output[:] = [f"{probabilities}_uncalibrated" if out == probabilities else out for out in node.output]
    scaled = f"{logits}_over_temperature"
    graph.initializer.append(value)
    graph.node.extend([
        helper.make_node("Div", [logits, TEMPERATURE_INITIALIZER], [scaled], name="calibration_divide"),
        helper.make_node("Softmax", [scaled], [probabilities], axis=-1, name="calibration_softmax"),
    ])
    _prune_dead_nodes(graph)
    onnx.checker.check_model(model)
    return model
