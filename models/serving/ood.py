"""In-domain score from the embedding: is this image like the ones the model was trained on?

Torch-free (numpy; scikit-learn for the covariance at fit time). Fitted at export, stored with
the version as `ood.npz` plus the manifest's `ood` section, read by the runtime at serving.

Method (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution
samples"): the class means of the training embeddings and one covariance shared by all classes
(Ledoit-Wolf shrinkage: a 1280-d covariance from a few hundred images is singular otherwise).
An image's distance is its Mahalanobis distance to the nearest class mean. Embeddings are
L2-normalised first, so the distance measures direction, not feature magnitude.

The served score is how typical that distance is among the validation images: in_domain =
share of validation images at least as far away (1 = as close as the closest, 0 = farther than
all of them). `IN_DOMAIN_THRESHOLD` = 0.05 keeps 95 % of the validation images in domain.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from models.serving.calibration import l2_normalise

OOD_FILE = "ood.npz"
METHOD = "mahalanobis"
IN_DOMAIN_THRESHOLD = 0.05
QUANTILES = np.linspace(0.0, 100.0, 101)


def _normalise(embeddings: np.ndarray) -> np.ndarray:
    return l2_normalise(np.asarray(embeddings, dtype=np.float64))


@dataclass
class OodModel:
    """Whitened class means; distances of validation images for the score's scale."""

    whitening: np.ndarray  # [D, D]: (x - mu) @ whitening has identity covariance
    means: np.ndarray  # [C, D] class means, already whitened
    quantiles: np.ndarray  # [101] validation distances at percentiles 0..100
    normalise: bool = True

    def distance(self, embeddings: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row to its nearest class mean `[N]`."""
        x = _normalise(embeddings) if self.normalise else np.asarray(embeddings, np.float64)
        z = x @ self.whitening
        squared = (z * z).sum(1, keepdims=True) - 2 * z @ self.means.T + (self.means * self.means).sum(1)
        return np.sqrt(np.maximum(squared.min(axis=1), 0.0))

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """In-domain score in [0, 1] per row (see the module docstring)."""
        percentile = np.interp(self.distance(embeddings), self.quantiles, QUANTILES)
        return 1.0 - percentile / 100.0

    @property
    def threshold_distance(self) -> float:
        return float(np.interp(100.0 * (1.0 - IN_DOMAIN_THRESHOLD), QUANTILES, self.quantiles))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / OOD_FILE
        with path.open("wb") as handle:  # a handle: np.savez would append .npz to a str path
            np.savez(handle, whitening=self.whitening.astype(np.float32), means=self.means.astype(np.float32),
                     quantiles=self.quantiles, normalise=np.array(self.normalise))
        return path

    @classmethod
    def load(cls, directory: str | Path, file: str = OOD_FILE) -> "OodModel":
        with np.load(Path(directory) / file, allow_pickle=False) as data:
            return cls(whitening=data["whitening"].astype(np.float64), means=data["means"].astype(np.float64),
                       quantiles=data["quantiles"].astype(np.float64), normalise=bool(data["normalise"]))

    def section(self, train: int, val: int) -> dict[str, Any]:
        """What the manifest records about it (the arrays stay in `ood.npz`)."""
        return {
            "method": METHOD,
            "file": OOD_FILE,
            "dims": int(self.whitening.shape[0]),
            "threshold": IN_DOMAIN_THRESHOLD,
            "threshold_distance": self.threshold_distance,
            "normalised": self.normalise,
            "fitted_on": {"train": train, "val": val},
        }


def fit_ood(train_embeddings: np.ndarray, train_labels: Sequence[int], val_embeddings: np.ndarray,
            num_classes: int, normalise: bool = True) -> OodModel:
    """Class means and shared shrunk covariance of the train embeddings; scale from validation."""
    from sklearn.covariance import ledoit_wolf

    x = _normalise(train_embeddings) if normalise else np.asarray(train_embeddings, np.float64)
    labels = np.asarray(train_labels, dtype=np.int64)
    if len(x) < 2:
        raise ValueError("the in-domain score needs at least two training embeddings")
    means = np.zeros((num_classes, x.shape[1]))
    present = np.unique(labels)
    for c in present:
        means[c] = x[labels == c].mean(axis=0)
    covariance, _ = ledoit_wolf(x - means[labels], assume_centered=True)
    if not np.isfinite(covariance).all() or not covariance.any():
        # one image per class leaves no spread around the means: fall back to the spread of the data
        covariance = np.eye(x.shape[1]) * max(float(x.var()), 1e-12)
    values, vectors = np.linalg.eigh(covariance)
    whitening = vectors / np.sqrt(np.maximum(values, values.max() * 1e-9))
    model = OodModel(whitening=whitening, means=means[present] @ whitening,
                     quantiles=np.zeros_like(QUANTILES), normalise=normalise)
    model.quantiles = np.percentile(model.distance(val_embeddings), QUANTILES)
    return model
