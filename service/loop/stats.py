"""The statistics of the production loop, numpy only: live accuracy's confidence interval, the
embedding drift test, and label-distribution distances.

- `wilson`: the Wilson score interval of a proportion; unlike the normal approximation it stays
  inside [0, 1] and is honest for the small counts live feedback starts with.
- `mmd_test`: the kernel two-sample test (Gretton et al. 2012): squared MMD with a Gaussian
  kernel whose width is the median pairwise distance of the reference, and a permutation p-value
  (the share of random relabellings of the pooled sample with an MMD at least as large). One
  kernel matrix serves every permutation, so a window of a few hundred costs milliseconds.
- `psi` and `chi_square`: the predicted-label distribution of a window against the reference's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
# scipy.special, not scipy.stats: imported with the worker in 0.1 s, where scipy.stats takes 0.6 s, and a
# lazy import inside the first drift pass held that worker's records back by as long
from scipy.special import gammaincc

EPSILON = 1e-4  # floor for an empty bin in PSI, so a label never seen gives a large, finite value


def wilson(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % (z = 1.96) Wilson interval of `successes / total`; (0, 1) when total is 0."""
    if total <= 0:
        return 0.0, 1.0
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def normalise_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _squared_distances(x: np.ndarray) -> np.ndarray:
    norms = (x * x).sum(1)
    return np.maximum(norms[:, None] + norms[None, :] - 2 * x @ x.T, 0.0)


def _mmd2(kernel: np.ndarray, first: np.ndarray) -> float:
    """Biased squared MMD of the pooled kernel split by the boolean mask `first`."""
    second = ~first
    return float(kernel[first][:, first].mean() + kernel[second][:, second].mean() - 2 * kernel[first][:, second].mean())


@dataclass(frozen=True)
class MmdResult:
    mmd2: float
    p_value: float
    reference: int
    window: int


def mmd_test(reference: np.ndarray, window: np.ndarray, permutations: int = 200, seed: int = 0) -> MmdResult:
    """Squared MMD of `window` against `reference` (rows are embeddings) and its permutation p-value."""
    reference, window = normalise_rows(reference), normalise_rows(window)
    pooled = np.concatenate([reference, window])
    distances = _squared_distances(pooled)
    reference_part = distances[: len(reference), : len(reference)]
    bandwidth = float(np.median(reference_part[np.triu_indices(len(reference), 1)])) or 1.0
    kernel = np.exp(-distances / bandwidth)
    mask = np.zeros(len(pooled), dtype=bool)
    mask[: len(reference)] = True
    observed = _mmd2(kernel, mask)
    rng = np.random.default_rng(seed)
    shuffled = np.stack([rng.permutation(mask) for _ in range(permutations)]) if permutations else mask[None, :0]
    at_least = int((_mmd2_many(kernel, shuffled) >= observed - 1e-12).sum()) if permutations else 0
    return MmdResult(observed, (at_least + 1) / (permutations + 1), len(reference), len(window))


def _mmd2_many(kernel: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """`_mmd2` for each row of `masks` at once: with weights w = 1/n1 on one side and -1/n2 on the
    other, the biased MMD² is wᵀKw, so every permutation is one matrix product (a day of windows
    is simulated in seconds: bench/loop.py --drift-day)."""
    first = masks.sum(1, keepdims=True)
    weights = np.where(masks, 1.0 / first, -1.0 / (masks.shape[1] - first))
    return np.einsum("pi,pi->p", weights @ kernel, weights)


def distribution(counts: dict[str, int], labels: list[str]) -> np.ndarray:
    """Counts in `labels` order as shares (uniform when empty)."""
    values = np.array([counts.get(label, 0) for label in labels], dtype=np.float64)
    total = values.sum()
    return values / total if total else np.full(len(labels), 1.0 / max(1, len(labels)))


def psi(expected: np.ndarray, observed: np.ndarray) -> float:
    """Population stability index; by convention < 0.1 stable, 0.1-0.25 moderate, > 0.25 shifted."""
    e = np.maximum(expected, EPSILON)
    o = np.maximum(observed, EPSILON)
    return float(((o - e) * np.log(o / e)).sum())


def chi_square(expected_shares: np.ndarray, observed_counts: np.ndarray) -> tuple[float, float]:
    """Pearson's goodness-of-fit statistic and p-value of observed counts against expected shares."""
    total = observed_counts.sum()
    keep = expected_shares > 0
    if total <= 0 or keep.sum() < 2:
        return 0.0, 1.0
    expected = expected_shares[keep] / expected_shares[keep].sum() * total
    # labels the reference never holds are left to PSI (which floors them), not divided by zero here
    statistic = float(((observed_counts[keep] - expected) ** 2 / expected).sum())
    degrees = keep.sum() - 1
    return statistic, float(gammaincc(degrees / 2, statistic / 2))  # the χ² survival function
