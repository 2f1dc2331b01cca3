"""Instant heads on frozen embeddings: fitted in seconds with numpy/scikit-learn, no torch.

Both strategies end as one linear map, so one ONNX head serves both (models/transfer/head_graph.py):

    logits = x @ weight.T + bias,   x = e / ‖e‖ (prototype) or e (logistic)

- `prototype`: class means of the L2-normalised train embeddings, normalised again; logits are
  cosine similarities divided by a temperature fitted by leave-one-out NLL (a sample never sees
  its own contribution to its class mean, so T is not fitted on memorised answers).
- `logistic`: scikit-learn's multinomial logistic regression on standardised embeddings; the
  standardisation is folded into `weight` and `bias`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.serving.calibration import l2_normalise, softmax
from models.jobs.train_config import INSTANT_STRATEGIES
PROTOTYPE_TEMPERATURE_BOUNDS = (1e-3, 10.0)  # cosine logits live in [-1/T, 1/T]
EPS = 1e-12


@dataclass
class LinearHead:
    strategy: str
    weight: np.ndarray  # [C, D] float32
    bias: np.ndarray  # [C] float32
    normalise: bool  # L2-normalise the embedding first
    details: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest's `training`

    def logits(self, embedding: np.ndarray) -> np.ndarray:
        """The numpy reference the ONNX head must match."""
        x = np.asarray(embedding, np.float64)
        if self.normalise:
            x = l2_normalise(x)
        return x @ self.weight.astype(np.float64).T + self.bias.astype(np.float64)

    def probabilities(self, embedding: np.ndarray) -> np.ndarray:
        return softmax(self.logits(embedding))


def mean_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probabilities[np.arange(len(targets)), targets].mean())


def _check(embedding: np.ndarray, targets: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(embedding, np.float64), np.asarray(targets, np.int64)
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"embedding must be [N, D] with N = len(targets) > 0, got {list(x.shape)} and {len(y)} targets")
    missing = sorted(set(range(num_classes)) - set(y.tolist()))
    if missing:
        raise ValueError(f"no training images for class indices {missing}")
    return x, y


def leave_one_out_cosines(x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """[N, C] cosine to every class prototype, the own class's prototype computed without the sample."""
    sums = np.zeros((num_classes, x.shape[1]))
    np.add.at(sums, y, x)
    counts = np.bincount(y, minlength=num_classes)
    cosines = x @ l2_normalise(sums).T
    alone = counts[y] == 1  # a class of one keeps its own prototype: nothing else to leave in
    own = np.where(alone[:, None], sums[y], sums[y] - x)
    cosines[np.arange(len(y)), y] = np.sum(x * l2_normalise(own), axis=1)
    return cosines


def fit_prototype(embedding: np.ndarray, targets: np.ndarray, num_classes: int) -> LinearHead:
    from scipy.optimize import minimize_scalar

    x, y = _check(embedding, targets, num_classes)
    x = l2_normalise(x)
    sums = np.zeros((num_classes, x.shape[1]))
    np.add.at(sums, y, x)
    prototypes = l2_normalise(sums)
    cosines = leave_one_out_cosines(x, y, num_classes)
    low, high = np.log(PROTOTYPE_TEMPERATURE_BOUNDS[0]), np.log(PROTOTYPE_TEMPERATURE_BOUNDS[1])
    fitted = minimize_scalar(lambda log_t: mean_nll(cosines / np.exp(log_t), y), bounds=(low, high), method="bounded")
    temperature = float(np.exp(fitted.x))
    return LinearHead("prototype", (prototypes / temperature).astype(np.float32), np.zeros(num_classes, np.float32),
                      normalise=True, details={"temperature": temperature, "fit_images": int(len(y))})


def fit_logistic(embedding: np.ndarray, targets: np.ndarray, num_classes: int, c: float = 1.0) -> LinearHead:
    from sklearn.linear_model import LogisticRegression

    x, y = _check(embedding, targets, num_classes)
    mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    model = LogisticRegression(C=c, max_iter=2000).fit((x - mean) / std, y)
    coef, intercept = model.coef_, model.intercept_
    if num_classes == 2 and coef.shape[0] == 1:  # scikit-learn's binary form: one logit for class 1
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
    weight = coef / std  # (x - mean) / std @ coef.T + b  ==  x @ (coef / std).T + (b - coef @ (mean / std))
    bias = intercept - coef @ (mean / std)
    return LinearHead("logistic", weight.astype(np.float32), bias.astype(np.float32), normalise=False,
                      details={"C": c, "fit_images": int(len(y)), "iterations": int(np.max(model.n_iter_))})


def fit_head(strategy: str, embedding: np.ndarray, targets: np.ndarray, num_classes: int) -> LinearHead:
    if strategy == "prototype":
        return fit_prototype(embedding, targets, num_classes)
    if strategy == "logistic":
        return fit_logistic(embedding, targets, num_classes)
    raise ValueError(f"unknown instant strategy {strategy!r}; known: {list(INSTANT_STRATEGIES)}")
