"""Calibration on rows the head never saw (training/crossfit.py, models/serving/trust.py's `val_logits`).

auto refits its cheap heads on train + val, so the published head's own val logits are over-confident
and a temperature fitted on them does not correct the served probabilities. Cross-fitted val logits
(each from the same head refitted without that row's fold) do.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from models.serving import calibration as cal
from training.crossfit import crossfit_logits, folds_of
from training.multidepth import fit_fixed


@dataclass
class Rows:
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    embedding_dim: int


def gaussian_rows(n: int, rng: np.random.Generator, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping classes in many dimensions: a linear head fits its rows perfectly and the rest not."""
    y = np.arange(n) % len(means)
    return means[y] + rng.normal(size=(n, means.shape[1])), y


def problem(seed: int = 0) -> tuple[Rows, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(3, 120)) * 0.15  # about 60 % test accuracy: errors on every split
    train_x, train_y = gaussian_rows(45, rng, means)
    val_x, val_y = gaussian_rows(30, rng, means)
    test_x, test_y = gaussian_rows(900, rng, means)
    return Rows(train_x, train_y, val_x, val_y, 120), test_x, test_y


def test_folds_deal_every_class_over_every_fold():
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    folds = folds_of(y, 3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(y)))
    assert all(set(y[fold]) == {0, 1, 2} for fold in folds)
    assert len(folds_of(np.array([0, 1]), 3)) == 2  # never an empty fold


def test_each_val_row_is_scored_by_a_head_fitted_without_it():
    rows, _, _ = problem()
    logits = crossfit_logits("logistic", {"c": 0.3}, rows, 3, True)
    fold = folds_of(rows.val_y)[0]
    rest = np.setdiff1d(np.arange(len(rows.val_y)), fold)
    head = fit_fixed(np.concatenate([rows.train_x, rows.val_x[rest]]),
                     np.concatenate([rows.train_y, rows.val_y[rest]]), 0.3, 3, True)
    np.testing.assert_allclose(logits[fold], head.logits(rows.val_x[fold]), rtol=1e-4, atol=1e-4)
    assert crossfit_logits("full", {}, rows, 3, True) is None  # a fine-tune never trained on val


@pytest.mark.parametrize("strategy", ["logistic", "prototype"])
def test_crossfitted_temperature_lowers_test_ece(strategy):
    """The old way (T on the published head's own val logits) leaves the test split over-confident;
    T on cross-fitted val logits brings its ECE down."""
    from models.transfer.heads import fit_prototype

    rows, test_x, test_y = problem()
    all_x, all_y = np.concatenate([rows.train_x, rows.val_x]), np.concatenate([rows.train_y, rows.val_y])
    if strategy == "logistic":
        published = fit_fixed(all_x, all_y, 0.3, 3, True).logits
    else:
        published = fit_prototype(all_x, all_y, 3).logits
    seen_t = cal.fit_temperature(published(rows.val_x), rows.val_y)
    crossfit_t = cal.fit_temperature(crossfit_logits(strategy, {"c": 0.3}, rows, 3, True), rows.val_y)
    test_logits = published(test_x)
    before = cal.ece(cal.softmax(test_logits, seen_t), test_y)
    after = cal.ece(cal.softmax(test_logits, crossfit_t), test_y)
    assert after < before
    assert cal.nll_of_logits(test_logits, test_y, crossfit_t) < cal.nll_of_logits(test_logits, test_y, seen_t)


def test_calibrate_version_fits_on_the_given_val_logits(tmp_path):
    from models.artifact.manifest import read_manifest
    from models.serving.trust import calibrate_version
    from tests.tiny import noisy_colour_samples, write_tiny_model

    write_tiny_model(tmp_path / "model", embedding=True)
    train = noisy_colour_samples(tmp_path / "train", 10, seed=1)
    val = noisy_colour_samples(tmp_path / "val", 10, seed=2)
    y = np.array([["red", "green", "blue"].index(s.label) for s in val])
    given = np.eye(3)[y] * 2.0 + np.random.default_rng(0).normal(size=(len(val), 3))
    calibrate_version(tmp_path / "model", "tiny", train, val, val_logits=given)
    manifest = read_manifest(tmp_path / "model")
    assert manifest.calibration.fitted_on == "val, cross-fitted" and manifest.calibration.samples == len(val)
    assert manifest.temperature == pytest.approx(cal.fit_temperature(given, y), rel=1e-6)


@pytest.mark.slow
def test_an_auto_run_publishes_calibration_fitted_on_crossfitted_val(tmp_path, bento_home):
    """End to end: auto's cheap head → export → calibrate_version with the cross-fitted val logits."""
    from models.artifact import store
    from tests.test_training import make_dataset
    from training.config import TrainConfig
    from training.pipeline import run

    config = TrainConfig(name="tiny", source="simple_cnn", data=str(make_dataset(tmp_path / "data")), image_size=32,
                         budget_s=5.0, output_dir=str(tmp_path / "run"), int8=False)
    result = run(config)
    manifest = store.resolve("tiny").manifest()
    assert manifest.training["strategy"] in {"prototype", "logistic", "multidepth"}
    assert manifest.calibration.fitted_on == "val, cross-fitted"
    assert manifest.calibration.samples == manifest.dataset.num_val and result.report["calibration"]["after"]
