"""LogME against a brute-force evidence on small matrices, and the logistic probe."""
import numpy as np
import pytest

from models.transfer.logme import log_evidence, logme, maximise_evidence, probe_accuracy, spectrum


def brute_force_log_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y | 0, β⁻¹ I + α⁻¹ F Fᵀ): the marginal likelihood with w integrated out, no SVD tricks."""
    n = f.shape[0]
    covariance = np.eye(n) / beta + f @ f.T / alpha
    _, log_det = np.linalg.slogdet(covariance)
    return float(-0.5 * (n * np.log(2 * np.pi) + log_det + y @ np.linalg.solve(covariance, y)))


def small_problem(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, d))
    y = (f[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(float)
    return f, y


@pytest.mark.parametrize("n,d", [(12, 4), (6, 9), (20, 20)])  # tall, wide (N < D: few images, big features), square
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.1, 5.0), (7.0, 0.3)])
def test_closed_form_evidence_equals_brute_force(n, d, alpha, beta):
    f, y = small_problem(n, d)
    assert log_evidence(spectrum(f), y, alpha, beta) == pytest.approx(brute_force_log_evidence(f, y, alpha, beta), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("n,d", [(15, 3), (8, 12)])
def test_fixed_point_reaches_the_maximum_of_a_grid_search(n, d):
    f, y = small_problem(n, d, seed=1)
    best, alpha, beta = maximise_evidence(spectrum(f), y)
    grid = np.logspace(-3, 3, 61)
    grid_best = max(brute_force_log_evidence(f, y, a, b) for a in grid for b in grid)
    assert best >= grid_best - 1e-6  # no grid point beats the fixed point
    assert best == pytest.approx(brute_force_log_evidence(f, y, alpha, beta), rel=1e-9)
    assert best - grid_best < 0.05  # and the grid, 10 points per decade, gets close to it


def test_score_is_mean_per_class_evidence_over_n():
    f, y = small_problem(10, 3)
    labels = y.astype(int)
    spec = spectrum(f)
    by_hand = np.mean([maximise_evidence(spec, (labels == k).astype(float))[0] for k in (0, 1)]) / 10
    assert logme(f, labels) == pytest.approx(by_hand)
    assert logme(f, np.where(labels == 1, "cat", "dog")) == pytest.approx(by_hand)  # any label type


def test_informative_features_outscore_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 15)
    centres = rng.normal(size=(4, 16)) * 3
    informative = centres[labels] + rng.normal(size=(60, 16))
    noise = rng.normal(size=(60, 16))
    assert logme(informative, labels) > logme(noise, labels) + 0.5
    assert probe_accuracy(informative, labels) > 0.9 > 0.5 > probe_accuracy(noise, labels)


def test_degenerate_inputs_are_refused_or_finite():
    with pytest.raises(ValueError, match="at least 2 classes"):
        logme(np.ones((4, 3)), np.zeros(4))
    with pytest.raises(ValueError, match="feature rows"):
        logme(np.ones((4, 3)), np.arange(3))
    separable = np.eye(6)  # every one-hot column fits exactly: the residual floor keeps it finite
    assert np.isfinite(logme(separable, np.array([0, 0, 1, 1, 2, 2])))
    with pytest.raises(ValueError, match="at least 2 images in every class"):
        probe_accuracy(np.ones((3, 2)), np.array([0, 0, 1]))
