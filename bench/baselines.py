"""Baselines a transfer must beat, fitted on a target's train split and scored on its test split.

On raw pixels (no source model): a logistic regression and an RBF SVC. On a source's frozen
embedding: a cosine k-NN and a standardised logistic probe. Each returns `Scores` (accuracy, macro F1,
balanced accuracy, per-class recall) and the wall time of preprocessing, fitting and predicting.

Raw pixels are scaled to [0, 1], kept as one channel when the images are grey (all three channels
equal), and resized to the train split's native size (at most `max_side` a side), so a test split
of another size (MNIST's 28x28 against digits' 8x8) is compared on the same grid.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

MAX_SIDE = 32  # raw pixels above this side are downsampled: an SVC on 64x64x3 inputs is slow and no better
SVC_C_GRID = (1.0, 10.0, 100.0)
PROBE_C_GRID = (0.01, 0.1, 1.0, 10.0)
CV_FOLDS = 3


@dataclass
class Scores:
    accuracy: float
    macro_f1: float
    balanced_accuracy: float
    per_class_recall: list[float]  # in the order of the sorted class ids of y_true
    seconds: float


def score(y_true: np.ndarray, y_pred: np.ndarray, seconds: float) -> Scores:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = np.unique(y_true)
    recall = recall_score(y_true, y_pred, labels=classes, average=None, zero_division=0)
    return Scores(accuracy=round(float(accuracy_score(y_true, y_pred)), 4),
                  macro_f1=round(float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)), 4),
                  balanced_accuracy=round(float(balanced_accuracy_score(y_true, y_pred)), 4),
                  per_class_recall=[round(float(r), 4) for r in recall], seconds=round(float(seconds), 3))


def pixel_grid(train_x: np.ndarray, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(height, width) every image is resized to: the train split's own, scaled down to fit max_side."""
    height, width = train_x.shape[1:3]
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def pixels(images: np.ndarray, grid: tuple[int, int], grey: bool) -> np.ndarray:
    """uint8 [N, H, W, 3] → float [N, h·w(·3)] in [0, 1] on `grid`, one channel when `grey`."""
    from PIL import Image

    images = np.asarray(images, np.uint8)
    if grey:
        images = images[..., :1]
    if images.shape[1:3] != grid:
        mode = "L" if grey else "RGB"
        images = np.stack([np.asarray(Image.fromarray(img.squeeze(-1) if grey else img, mode)
                                      .resize(grid[::-1], Image.Resampling.BILINEAR)) for img in images])
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def is_grey(*image_sets: np.ndarray) -> bool:
    return all(np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2]) for x in image_sets)


def raw_features(train_x: np.ndarray, test_x: np.ndarray, max_side: int = MAX_SIDE) -> tuple[np.ndarray, np.ndarray]:
    grid, grey = pixel_grid(train_x, max_side), is_grey(train_x, test_x)
    return pixels(train_x, grid, grey), pixels(test_x, grid, grey)


def cv_folds(labels: np.ndarray, folds: int = CV_FOLDS) -> int:
    """Stratified folds the train split allows (capped by its smallest class); < 2 means no CV."""
    return min(folds, int(np.unique(labels, return_counts=True)[1].min()))


def with_cv_grid(estimator, name: str, grid: tuple[float, ...], labels: np.ndarray, seed: int = 0):
    """`estimator` with its C chosen by stratified CV over `grid`, or as given when a class has < 2 images."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    folds = cv_folds(labels)
    if folds < 2:
        return estimator
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return GridSearchCV(estimator, {name: list(grid)}, cv=splitter, n_jobs=1)


def raw_logistic(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 max_side: int = MAX_SIDE) -> Scores:
    """A logistic regression on raw pixels in [0, 1] (C = 1)."""
    from sklearn.linear_model import LogisticRegression

    started = time.perf_counter()
    train_p, test_p = raw_features(train_x, test_x, max_side)
    predicted = LogisticRegression(C=1.0, max_iter=2000).fit(train_p, train_y).predict(test_p)
    return score(test_y, predicted, time.perf_counter() - started)


def raw_svc(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
            max_side: int = MAX_SIDE) -> Scores:
    """An RBF SVC on raw pixels in [0, 1] (gamma 'scale'), C from a small CV grid when every class has ≥ 2 images."""
    from sklearn.svm import SVC

    started = time.perf_counter()
    train_p, test_p = raw_features(train_x, test_x, max_side)
    model = with_cv_grid(SVC(kernel="rbf", C=10.0, gamma="scale"), "C", SVC_C_GRID, train_y)
    predicted = model.fit(train_p, train_y).predict(test_p)
    return score(test_y, predicted, time.perf_counter() - started)


def normalised(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float64)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def embedding_knn(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, test_y: np.ndarray,
                  k: int = 5) -> Scores:
    """A cosine k-NN (L2-normalised embeddings, majority vote) on a source's embedding; k capped by the train size."""
    from sklearn.neighbors import KNeighborsClassifier

    started = time.perf_counter()
    knn = KNeighborsClassifier(n_neighbors=min(k, len(train_y))).fit(normalised(train_f), train_y)
    predicted = knn.predict(normalised(test_f))
    return score(test_y, predicted, time.perf_counter() - started)


def embedding_logistic(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, test_y: np.ndarray) -> Scores:
    """The logistic probe on a source's embedding: standardised features, C chosen by stratified CV."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    started = time.perf_counter()
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    model = with_cv_grid(probe, "logisticregression__C", PROBE_C_GRID, train_y)
    predicted = model.fit(np.asarray(train_f, np.float64), train_y).predict(np.asarray(test_f, np.float64))
    return score(test_y, predicted, time.perf_counter() - started)
