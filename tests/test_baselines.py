"""The transfer benchmark's baselines on a toy separable set: raw pixels and a stand-in embedding."""
import numpy as np
import pytest

from bench.baselines import (Scores, embedding_knn, embedding_logistic, pixel_grid, raw_features, raw_logistic,
                             raw_svc, score)


def bars(per_class: int, side: int, seed: int, colour: bool = False):
    """Class 0: a bright left half; class 1: a bright right half; 2: a bright top half; noise on top."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), per_class)
    images = rng.integers(0, 60, (labels.size, side, side, 3 if colour else 1))
    half = side // 2
    for i, label in enumerate(labels):
        region = (slice(None), slice(0, half)) if label == 0 else (slice(None), slice(half, None)) if label == 1 \
            else (slice(0, half), slice(None))
        images[i][region] += 180
    images = np.clip(images, 0, 255).astype(np.uint8)
    return (images if colour else np.repeat(images, 3, axis=-1)), labels


@pytest.mark.parametrize("baseline", [raw_logistic, raw_svc])
def test_raw_pixel_baselines_separate_a_separable_set(baseline):
    train_x, train_y = bars(8, 8, seed=0)
    test_x, test_y = bars(5, 16, seed=1)  # another size: resized to the train grid
    scores = baseline(train_x, train_y, test_x, test_y)
    assert isinstance(scores, Scores) and scores.accuracy == scores.macro_f1 == scores.balanced_accuracy == 1.0
    assert scores.per_class_recall == [1.0, 1.0, 1.0] and scores.seconds > 0
    tiny_x, tiny_y = bars(1, 8, seed=2)  # one image per class: no CV grid, still a fit
    assert baseline(tiny_x, tiny_y, test_x, test_y).accuracy > 0.6


def test_raw_features_grey_colour_and_grid():
    grey_x, _ = bars(2, 8, seed=0)
    colour_x, _ = bars(2, 8, seed=0, colour=True)
    train, test = raw_features(grey_x, bars(2, 28, seed=1)[0])
    assert train.shape == test.shape == (6, 64) and 0 <= train.min() and train.max() <= 1  # one channel, 8x8
    assert raw_features(colour_x, colour_x)[0].shape == (6, 192)
    assert pixel_grid(np.zeros((1, 64, 48, 3))) == (32, 24) and pixel_grid(np.zeros((1, 8, 8, 3))) == (8, 8)


def test_embedding_baselines_on_separable_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5

    def embed(labels):
        return centres[labels] + rng.normal(size=(labels.size, 16))

    train_y, test_y = np.repeat(np.arange(3), 6), np.repeat(np.arange(3), 4)
    train_f, test_f = embed(train_y), embed(test_y)
    for scores in (embedding_knn(train_f, train_y, test_f, test_y, k=3), embedding_logistic(train_f, train_y, test_f, test_y)):
        assert scores.accuracy == 1.0 and scores.per_class_recall == [1.0, 1.0, 1.0]
    assert embedding_knn(train_f, train_y, test_f, test_y, k=50).accuracy < 1.0  # k capped at 18: a majority vote of all


def test_score_counts_the_minority_class():
    y_true = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    y_pred = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1])  # one of two minority images found
    scores = score(y_true, y_pred, 1.23456)
    assert scores.accuracy == 0.9 and scores.per_class_recall == [1.0, 0.5] and scores.balanced_accuracy == 0.75
    assert scores.macro_f1 == pytest.approx((16 / 17 + 2 / 3) / 2, abs=1e-4) and scores.seconds == 1.235
