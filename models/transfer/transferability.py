"""Scores that predict how well a source's frozen features transfer to a labelled target, and how to
combine and check them. Torch-free (numpy, scipy, scikit-learn); LogME lives in models/transfer/logme.py.

SFDA (Shao et al., "Not All Models Are Equal: Predicting Model Transferability in a Self-challenging
Fisher Space", ECCV 2022), as the authors' code computes it:
  1. a shrinkage Fisher (LDA) fit: within-class covariance S_w = Σ_k π_k Cov(X_k), shrinkage
     λ = max(exp(−5 · λ_max(S_w)), 1e−10), S_w' = (1 − λ) S_w + λ tr(S_w)/D · I, the total covariance
     shrunk the same way, S_b = S_t' − S_w'; the Fisher directions are the generalised eigenvectors
     of (S_b, S_w'), and each class scores x with the linear discriminant in that space;
  2. ConfMix (self-challenging): p = softmax of the first fit's class probabilities (softened, so the
     mix is meaningful); each x moves towards the mean of the *other* classes' means by 1 − p(y|x);
  3. a second fit with the same λ on the mixed features; the score is the mean probability of the
     true class (the authors drop the paper's log "in case of instability"; so do we). In [0, 1].
Hard targets (features where classes overlap) get pulled into each other by ConfMix and score low.

The scores fit the features they are given (no held-out split), so with few images and many
dimensions any features look separable: `reduce` projects onto the leading principal components first.
"""
from __future__ import annotations

import numpy as np

from models.serving.calibration import softmax

SHRINKAGE_FLOOR = 1e-10
IMAGES_PER_DIMENSION = 8  # SFDA fits and scores the same images: D ≤ N/8 keeps featureless data near chance
MAX_SCORING_DIMS = 256  # beyond this the covariance eigendecompositions cost more than they tell


def scoring_dims(num_samples: int, num_classes: int) -> int:
    """How many principal components to give SFDA for N images of C classes (see `reduce`).

    Fitted and scored on the same N images, a Fisher discriminant finds separating directions in
    pure noise once D nears N (random 1280-d features of 30 images score 1.0); at N/8 they stay near chance."""
    return int(min(MAX_SCORING_DIMS, max(num_classes, num_samples // IMAGES_PER_DIMENSION)))


def _as_problem(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 [N, D] features and labels as 0..C−1, checked."""
    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or x.shape[0] != labels.shape[0]:
        raise ValueError(f"features must be [N, D] with one label per row, got {list(x.shape)} and {labels.shape[0]} labels")
    classes, y = np.unique(labels, return_inverse=True)
    if classes.size < 2:
        raise ValueError(f"a transferability score needs at least 2 classes, got {classes.size}")
    return x, y.astype(np.int64)


def reduce(features: np.ndarray, max_dim: int) -> np.ndarray:
    """Features projected onto their `max_dim` leading principal components when D > max_dim, else as given.

    The component count is also capped by N (beyond it there is no variance left to keep)."""
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float64)
    if max_dim < 1:
        raise ValueError(f"max_dim must be >= 1, got {max_dim}")
    if x.shape[1] <= max_dim:
        return x
    return PCA(n_components=min(max_dim, x.shape[0]), svd_solver="full").fit_transform(x)


def _shrunk(covariance: np.ndarray, shrinkage: float) -> np.ndarray:
    """(1 − λ) Σ + λ μ I with μ the mean variance: Ledoit–Wolf-style shrinkage towards a scaled identity."""
    dims = covariance.shape[0]
    mean_variance = np.trace(covariance) / dims
    return (1.0 - shrinkage) * covariance + shrinkage * mean_variance * np.eye(dims)


def _fisher_fit(x: np.ndarray, y: np.ndarray, classes: int, shrinkage: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """The shrinkage Fisher discriminant: (coef [C, D], intercept [C], λ); class logits are x coefᵀ + intercept."""
    from scipy import linalg

    counts = np.bincount(y, minlength=classes)
    priors = counts / y.size
    means = np.zeros((classes, x.shape[1]))
    np.add.at(means, y, x)
    means /= counts[:, None]
    within_centred = x - means[y]
    within = within_centred.T @ within_centred / y.size  # Σ_k π_k Cov(X_k), each biased
    if np.trace(within) <= 0:
        raise ValueError("features do not vary within any class: nothing to score")
    if shrinkage is None:  # the larger the within-class spread, the less shrinkage the covariance needs
        largest = float(linalg.eigvalsh(within, subset_by_index=[x.shape[1] - 1, x.shape[1] - 1])[0])
        shrinkage = max(float(np.exp(-5.0 * largest)), SHRINKAGE_FLOOR)
    total_centred = x - x.mean(axis=0)
    within_shrunk = _shrunk(within, shrinkage)
    between = _shrunk(total_centred.T @ total_centred / y.size, shrinkage) - within_shrunk
    values, vectors = linalg.eigh(between, within_shrunk)
    vectors = vectors[:, np.argsort(values)[::-1]]
    coef = means @ vectors @ vectors.T
    intercept = -0.5 * np.sum(means * coef, axis=1) + np.log(priors)
    return coef, intercept, shrinkage


def sfda(features: np.ndarray, labels: np.ndarray) -> float:
    """SFDA score of `features [N, D]` for `labels [N]`: higher means the features transfer better (0..1)."""
    x, y = _as_problem(features, labels)
    classes = int(y.max()) + 1
    coef, intercept, shrinkage = _fisher_fit(x, y, classes, None)
    confidence = softmax(softmax(x @ coef.T + intercept))[np.arange(y.size), y][:, None]
    means = np.stack([x[y == k].mean(axis=0) for k in range(classes)])
    others = (means.sum(axis=0) - means) / (classes - 1)  # for each class, the mean of the other classes' means
    mixed = confidence * x + (1.0 - confidence) * others[y]
    coef, intercept, _ = _fisher_fit(mixed, y, classes, shrinkage)
    return float(softmax(mixed @ coef.T + intercept)[np.arange(y.size), y].mean())


def knn_cv_score(features: np.ndarray, labels: np.ndarray, k: int = 5, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated accuracy of a cosine k-NN (L2-normalised features), stratified folds.

    Folds are capped by the smallest class and k by the smallest training fold."""
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    x, y = _as_problem(features, labels)
    folds = min(folds, int(np.bincount(y).min()))
    if folds < 2:
        raise ValueError("k-NN cross-validation needs at least 2 images in every class")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    correct = 0
    for train, test in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y):
        knn = KNeighborsClassifier(n_neighbors=min(k, train.size)).fit(x[train], y[train])
        correct += int((knn.predict(x[test]) == y[test]).sum())
    return correct / y.size


def rank_by_agreement(scores: dict[str, dict[str, float]]) -> list[tuple[str, float]]:
    """Sources ordered by their mean rank over the methods (`scores[method][source]`, higher is better).

    Within a method, tied scores share their average rank and a NaN ranks last; sources with the
    same mean rank keep the order of the first method's dict."""
    from scipy.stats import rankdata

    if not scores:
        raise ValueError("rank_by_agreement needs at least one method's scores")
    sources = list(next(iter(scores.values())))
    for method, by_source in scores.items():
        if set(by_source) != set(sources):
            raise ValueError(f"method {method!r} scores {sorted(by_source)}, expected {sorted(sources)}")
    ranks = np.zeros(len(sources))
    for by_source in scores.values():
        values = np.array([by_source[s] for s in sources], dtype=np.float64)
        ranks += rankdata(-np.nan_to_num(values, nan=-np.inf))
    mean = ranks / len(scores)
    order = sorted(range(len(sources)), key=lambda i: mean[i])
    return [(sources[i], float(mean[i])) for i in order]


def weighted_kendall_tau(predicted: dict[str, float], truth: dict[str, float]) -> float:
    """Weighted Kendall τ (scipy's weightedtau, hyperbolic weights: the top of the ranking counts most)
    between a predicted score and the true outcome per source; 1 = same order, −1 = reversed."""
    from scipy.stats import weightedtau

    if set(predicted) != set(truth):
        raise ValueError(f"predicted {sorted(predicted)} and truth {sorted(truth)} must name the same sources")
    names = list(truth)
    return float(weightedtau([predicted[n] for n in names], [truth[n] for n in names]).statistic)
