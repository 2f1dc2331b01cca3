"""How well frozen features fit a labelled dataset, without training: LogME and a linear probe.

LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
ICML 2021): for each class, a Bayesian linear regression of the one-hot column y on the features
F, with prior w ~ N(0, α⁻¹ I) and noise N(0, β⁻¹). Its log evidence

    L(α, β) = D/2 log α + N/2 log β − N/2 log 2π − β/2 ‖F m − y‖² − α/2 ‖m‖² − 1/2 log |A|,
    A = α I + β FᵀF,   m = β A⁻¹ Fᵀ y,

is maximised by the fixed-point updates γ = Σ β σᵢ / (α + β σᵢ), α ← γ / ‖m‖²,
β ← (N − γ) / ‖F m − y‖², where σᵢ are the eigenvalues of FᵀF. One thin SVD of F serves every
class and every iteration, so the cost is one SVD plus O(min(N, D)) per step. The score is the
mean over classes of L / N (higher is better; comparable across models on the same data).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ITERATIONS = 100
TOLERANCE = 1e-5  # relative change of α and β that ends the fixed-point loop


@dataclass(frozen=True)
class Spectrum:
    """F = U diag(s) Vᵀ (thin); what every class's evidence needs from the features."""

    u: np.ndarray  # [N, r]
    sigma: np.ndarray  # [r] eigenvalues of FᵀF (s²), the non-zero part
    num_samples: int
    num_features: int


def spectrum(features: np.ndarray) -> Spectrum:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got {list(f.shape)}")
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    keep = s > s.max() * max(f.shape) * np.finfo(np.float64).eps if s.size and s.max() > 0 else np.zeros_like(s, bool)
    return Spectrum(u[:, keep], s[keep] ** 2, f.shape[0], f.shape[1])


def log_evidence(spec: Spectrum, y: np.ndarray, alpha: float, beta: float) -> float:
    """L(α, β) for one target column, in closed form over the spectrum."""
    n, d, sigma = spec.num_samples, spec.num_features, spec.sigma
    projected = spec.u.T @ y  # coordinates of y in the column space of F
    shrink = beta * sigma / (alpha + beta * sigma)
    # ‖F m − y‖²: in the column space y is shrunk towards 0; outside it, untouched
    residual = float(np.sum(((shrink - 1.0) * projected) ** 2) + (y @ y - projected @ projected))
    # ‖m‖² with m = V diag(β sᵢ / (α + β σᵢ)) uᵢᵀy
    m_norm = float(np.sum((beta * np.sqrt(sigma) * projected / (alpha + beta * sigma)) ** 2))
    log_det = float(np.sum(np.log(alpha + beta * sigma)) + (d - sigma.size) * np.log(alpha))
    return (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - n / 2 * np.log(2 * np.pi)
            - beta / 2 * residual - alpha / 2 * m_norm - log_det / 2)


def maximise_evidence(spec: Spectrum, y: np.ndarray, alpha: float = 1.0, beta: float = 1.0) -> tuple[float, float, float]:
    """Fixed-point iteration of (α, β); returns (max log evidence, α, β)."""
    n, sigma = spec.num_samples, spec.sigma
    projected = spec.u.T @ y
    outside = max(float(y @ y - projected @ projected), 0.0)
    for _ in range(MAX_ITERATIONS):
        gamma = float(np.sum(beta * sigma / (alpha + beta * sigma)))
        m_norm = float(np.sum((beta * np.sqrt(sigma) * projected / (alpha + beta * sigma)) ** 2))
        residual = float(np.sum((alpha / (alpha + beta * sigma) * projected) ** 2)) + outside
        # floors keep a perfectly separable or all-zero column finite instead of dividing by 0
        new_alpha = max(gamma, 1e-12) / max(m_norm, 1e-12)
        new_beta = max(n - gamma, 1e-12) / max(residual, 1e-12)
        done = abs(new_alpha - alpha) / alpha < TOLERANCE and abs(new_beta - beta) / beta < TOLERANCE
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return log_evidence(spec, y, alpha, beta), alpha, beta


def one_hot(labels: np.ndarray) -> np.ndarray:
    classes, index = np.unique(np.asarray(labels), return_inverse=True)
    if classes.size < 2:
        raise ValueError(f"LogME needs at least 2 classes, got {classes.size}")
    return np.eye(classes.size)[index]


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME score of `features [N, D]` for integer or string `labels [N]`: mean over classes of L / N."""
    labels = np.asarray(labels)
    if labels.shape[0] != np.asarray(features).shape[0]:
        raise ValueError(f"{np.asarray(features).shape[0]} feature rows but {labels.shape[0]} labels")
    spec = spectrum(features)
    targets = one_hot(labels)
    return float(np.mean([maximise_evidence(spec, targets[:, k])[0] for k in range(targets.shape[1])]) / spec.num_samples)


def probe_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated accuracy of a logistic-regression probe on standardised features.

    Folds are capped by the smallest class, so a 2-images-per-class set still gets a 2-fold score.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    smallest = int(np.unique(labels, return_counts=True)[1].min())
    folds = min(folds, smallest)
    if folds < 2:
        raise ValueError("a probe needs at least 2 images in every class")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(probe, np.asarray(features, np.float64), labels, cv=splitter).mean())
