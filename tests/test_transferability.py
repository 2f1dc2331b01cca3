"""SFDA, the k-NN cross-validated score, the agreement ranking and τw, on hand-made toy sets."""
import numpy as np
import pytest

from models.transfer.transferability import (knn_cv_score, rank_by_agreement, reduce, scoring_dims, sfda,
                                    weighted_kendall_tau)

# three classes in 2-D, four points each: a small square around each class centre
CENTRES = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
SQUARE = np.array([[0.5, 0.5], [0.5, -0.5], [-0.5, 0.5], [-0.5, -0.5]])
TOY_Y = np.repeat(np.arange(3), 4)


def toy(spread: float) -> np.ndarray:
    return CENTRES[TOY_Y] + spread * np.tile(SQUARE, (3, 1))


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def paper_fisher(x, y, shrinkage=None):
    """The paper's regularised Fisher discriminant written out for 2-D: every class has 4 of 12 points,
    so the priors are 1/3; with all Fisher directions kept, W Wᵀ = S_w'⁻¹ (Wᵀ S_w' W = I)."""
    means = np.stack([x[y == k].mean(axis=0) for k in range(3)])
    within = sum(((x[y == k] - means[k]).T @ (x[y == k] - means[k])) for k in range(3)) / len(y)
    if shrinkage is None:
        a, b, d = within[0, 0], within[0, 1], within[1, 1]
        largest = (a + d) / 2 + np.sqrt(((a - d) / 2) ** 2 + b ** 2)  # a 2x2 symmetric matrix's top eigenvalue
        shrinkage = max(np.exp(-5 * largest), 1e-10)
    shrunk = (1 - shrinkage) * within + shrinkage * np.trace(within) / 2 * np.eye(2)
    coef = means @ np.linalg.inv(shrunk)
    intercept = -0.5 * np.einsum("kd,kd->k", means, coef) + np.log(1 / 3)
    return softmax(x @ coef.T + intercept), means, shrinkage


def paper_sfda(x, y):
    prob, means, shrinkage = paper_fisher(x, y)
    confidence = softmax(prob)[np.arange(len(y)), y][:, None]  # softened before ConfMix
    other_means = np.array([(means.sum(axis=0) - means[k]) / 2 for k in range(3)])
    mixed = confidence * x + (1 - confidence) * other_means[y]
    prob, _, _ = paper_fisher(mixed, y, shrinkage)
    return prob[np.arange(len(y)), y].mean()


@pytest.mark.parametrize("spread", [0.5, 2.0, 4.0])
def test_sfda_matches_the_written_out_formulas(spread):
    assert sfda(toy(spread), TOY_Y) == pytest.approx(paper_sfda(toy(spread), TOY_Y), rel=1e-9)


def test_sfda_scores_separated_features_above_mixed_ones():
    separated, overlapping, mixed = sfda(toy(0.5), TOY_Y), sfda(toy(2.0), TOY_Y), sfda(toy(4.0), TOY_Y)
    assert 0 < mixed < overlapping < separated <= 1
    assert separated > 0.99 and mixed < 0.6
    relabelled = np.array(["c", "a", "b"])[TOY_Y]  # labels of any type; the score does not depend on their names
    assert sfda(toy(2.0), relabelled) == pytest.approx(overlapping)


def test_sfda_refuses_what_it_cannot_score():
    with pytest.raises(ValueError, match="at least 2 classes"):
        sfda(toy(1.0), np.zeros(12))
    with pytest.raises(ValueError, match="do not vary within any class"):
        sfda(CENTRES[TOY_Y], TOY_Y)
    with pytest.raises(ValueError, match="one label per row"):
        sfda(toy(1.0), TOY_Y[:5])


def test_reduce_keeps_the_leading_components_only_when_there_are_too_many():
    rng = np.random.default_rng(0)
    wide = rng.normal(size=(20, 50)) * np.r_[10.0, np.ones(49) * 0.01]  # one direction carries the variance
    assert reduce(wide, 64).shape == (20, 50)
    reduced = reduce(wide, 5)
    assert reduced.shape == (20, 5) and reduce(wide, 500).shape == (20, 50)
    assert reduce(rng.normal(size=(4, 50)), 10).shape == (4, 4)  # no more components than images
    assert np.var(reduced[:, 0]) > 1000 * np.var(reduced[:, 1])
    assert scoring_dims(30, 3) == 3 and scoring_dims(800, 10) == 100 and scoring_dims(60000, 10) == 256


def test_sfda_on_reduced_noise_stays_near_chance():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 10)
    noise = rng.normal(size=(30, 1280))
    assert sfda(reduce(noise, scoring_dims(30, 3)), labels) < 0.5  # chance is 1/3
    signal = noise + 0.3 * rng.normal(size=(3, 1280))[labels]
    assert sfda(reduce(signal, scoring_dims(30, 3)), labels) > 0.9


def test_knn_cv_score_known_answers():
    rng = np.random.default_rng(0)
    a = np.c_[np.ones(6), 0.01 * rng.random(6)]  # class 0 points east
    b = np.c_[0.01 * rng.random(6), np.ones(6)]  # class 1 points north
    stray = np.array([[0.15, 1.0]])  # a class-0 image that looks like class 1: every fold gets it wrong
    features, labels = np.r_[a, b, stray], np.r_[np.zeros(6), np.ones(6), [0]].astype(int)
    assert knn_cv_score(features, labels, k=3, folds=5) == pytest.approx(12 / 13)
    scaled = features * rng.uniform(0.01, 100, size=(13, 1))  # cosine: the length of a feature vector is ignored
    assert knn_cv_score(scaled, labels, k=3, folds=5) == pytest.approx(12 / 13)
    assert knn_cv_score(np.r_[a, b], labels[:12], k=3, folds=5) == 1.0


def test_knn_cv_caps_folds_and_k_by_the_data():
    features, labels = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1]]), np.array([0, 0, 1, 1])
    assert knn_cv_score(features, labels, k=1, folds=5) == 1.0  # 2 folds: each has one image per class
    assert knn_cv_score(features, labels, k=5, folds=5) == knn_cv_score(features, labels, k=2, folds=2)  # k ≤ 2 images
    with pytest.raises(ValueError, match="at least 2 images in every class"):
        knn_cv_score(features[:3], labels[:3])


def test_rank_by_agreement_averages_ties():
    scores = {"logme": {"a": 1.0, "b": 1.0, "c": 0.0},  # a and b tie: 1.5 each
              "sfda": {"a": 0.5, "b": 0.9, "c": 0.1}}
    assert rank_by_agreement(scores) == [("b", 1.25), ("a", 1.75), ("c", 3.0)]
    level = rank_by_agreement({"x": {"p": 1.0, "q": 2.0}, "y": {"p": 2.0, "q": 1.0}})
    assert level == [("p", 1.5), ("q", 1.5)]  # a tie in mean rank keeps the first method's order
    assert rank_by_agreement({"x": {"p": float("nan"), "q": -5.0}}) == [("q", 1.0), ("p", 2.0)]


def test_rank_by_agreement_needs_the_same_sources_everywhere():
    with pytest.raises(ValueError, match="method 'sfda' scores \\['a'\\], expected \\['a', 'b'\\]"):
        rank_by_agreement({"logme": {"a": 1.0, "b": 0.0}, "sfda": {"a": 1.0}})
    with pytest.raises(ValueError, match="at least one method"):
        rank_by_agreement({})


def test_weighted_kendall_tau_sign():
    truth = {"a": 0.9, "b": 0.7, "c": 0.5, "d": 0.2}
    assert weighted_kendall_tau({"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0}, truth) == pytest.approx(1.0)
    assert weighted_kendall_tau({"a": 0.0, "b": 1.0, "c": 2.0, "d": 3.0}, truth) == pytest.approx(-1.0)
    top_swapped = weighted_kendall_tau({"a": 2.0, "b": 3.0, "c": 1.0, "d": 0.0}, truth)
    bottom_swapped = weighted_kendall_tau({"a": 3.0, "b": 2.0, "c": 0.0, "d": 1.0}, truth)
    assert 0 < top_swapped < bottom_swapped < 1  # an error at the top costs more
    with pytest.raises(ValueError, match="same sources"):
        weighted_kendall_tau({"a": 1.0}, truth)
