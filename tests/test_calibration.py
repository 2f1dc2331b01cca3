"""Calibration, thresholds, selective prediction, in-domain score and the abstention rule (torch-free)."""
import numpy as np
import pytest

from models.serving import calibration as cal
from models.serving.decision import AUTO, InvalidMinConfidence, check_supported, decide, parse_min_confidence
from models.artifact.manifest import Manifest, ManifestError, Preprocessing, parse_manifest
from models.serving.ood import IN_DOMAIN_THRESHOLD, OodModel, fit_ood


def _sampled(seed=0, n=3000, classes=5, true_t=3.0):
    """Labels drawn from softmax(z); the model reports 3 z, i.e. it is over-confident by T = 3."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, classes))
    p = cal.softmax(z)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return z * true_t, labels


def test_temperature_matches_brute_force_grid():
    logits, labels = _sampled(seed=1, n=400)
    fitted = cal.fit_temperature(logits, labels)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    losses = [cal.nll_of_logits(logits, labels, t) for t in grid]
    best = grid[int(np.argmin(losses))]
    assert fitted == pytest.approx(best, rel=2e-3)
    assert cal.nll_of_logits(logits, labels, fitted) <= min(losses) + 1e-9


def test_temperature_recovers_known_overconfidence_and_keeps_argmax():
    logits, labels = _sampled(seed=2, n=4000, true_t=3.0)
    fitted = cal.fit_temperature(logits, labels)
    assert fitted == pytest.approx(3.0, rel=0.1)
    before, after = cal.softmax(logits), cal.softmax(logits, fitted)
    assert (before.argmax(1) == after.argmax(1)).all()
    assert cal.ece(after, labels) < cal.ece(before, labels) / 2
    assert cal.nll(after, labels) < cal.nll(before, labels)


def test_temperature_stays_1_without_a_single_validation_error():
    logits = np.array([[3.0, 0.0], [0.5, 0.0], [0.0, 2.0]])
    assert cal.fit_temperature(logits, [0, 0, 1]) == 1.0  # the NLL would fall forever as T → 0
    assert cal.fit_temperature(logits, [0, 1, 1]) != 1.0  # one error: a real minimum


def test_ece_and_bins_hand_computed():
    # top confidences 0.95 (right), 0.95 (wrong), 0.65 (right), 0.62 (right), 0.55 (wrong); 15 bins of 1/15:
    # bin 14 (0.933, 1]: 2 images, conf .95, acc .5 → .45 * 2/5 = .18
    # bin 9 (0.6, 0.667]: 2 images, conf .635, acc 1 → .365 * 2/5 = .146
    # bin 8 (0.533, 0.6]: 1 image, conf .55, acc 0 → .55 * 1/5 = .11          ECE = .436
    probs = np.array([[0.95, 0.05], [0.05, 0.95], [0.65, 0.35], [0.38, 0.62], [0.55, 0.45]])
    labels = [0, 0, 0, 1, 1]
    assert cal.ece(probs, labels) == pytest.approx(0.436)
    bins = cal.reliability_bins(probs, labels)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 5
    assert bins[14] == {"lower": 14 / 15, "upper": 1.0, "count": 2, "confidence": pytest.approx(0.95), "accuracy": 0.5}
    assert bins[9]["count"] == 2 and bins[9]["confidence"] == pytest.approx(0.635) and bins[9]["accuracy"] == 1.0
    assert bins[8]["accuracy"] == 0.0 and bins[0]["count"] == 0 and bins[0]["accuracy"] is None


def test_nll_and_brier_hand_computed():
    probs = np.array([[0.8, 0.2], [0.4, 0.6]])
    labels = [0, 0]
    assert cal.nll(probs, labels) == pytest.approx(-(np.log(0.8) + np.log(0.4)) / 2)
    # (0.2² + 0.2²) and (0.6² + 0.6²), averaged
    assert cal.brier(probs, labels) == pytest.approx((0.08 + 0.72) / 2)


def test_best_f1_threshold_hand_computed():
    # predictions of one label, best first: right, wrong, right, wrong; 2 images truly have it.
    # keeping the top j gives F1 = 2 TP / (j + 2): .667, .5, .8, .667 → keep 3 → cut-off 0.7
    conf = np.array([0.6, 0.9, 0.7, 0.8])
    is_true = np.array([False, True, True, False])
    assert cal.best_f1_threshold(conf, is_true, positives=2) == pytest.approx(0.7)
    assert cal.best_f1_threshold(np.array([]), np.array([], bool), positives=3) == cal.DEFAULT_THRESHOLD
    assert cal.best_f1_threshold(np.array([0.9, 0.8]), np.array([False, False]), positives=1) > 0.9


def test_per_label_thresholds_and_selective_accuracy():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    labels = [0, 1, 0, 1, 1, 1]
    thresholds = cal.best_f1_thresholds(probs, labels)
    assert thresholds == [pytest.approx(0.7), pytest.approx(0.55)]
    answered = cal.answered_at(probs, thresholds)
    assert answered.tolist() == [True, True, True, False, True, True]
    assert cal.selective(probs, labels, answered) == {"coverage": 5 / 6, "accuracy": 0.8, "answered": 5}
    curve = {row["threshold"]: row for row in cal.risk_coverage(probs, labels)}
    assert curve[0.0]["coverage"] == 1.0 and curve[0.0]["accuracy"] == pytest.approx(4 / 6)
    assert curve[0.75]["answered"] == 2 and curve[0.75]["accuracy"] == 0.5
    assert curve[0.999]["answered"] == 0 and curve[0.999]["accuracy"] is None


def _clusters(seed, n_per_class=80, dims=16, classes=3, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dims))
    x = np.concatenate([c + spread * rng.normal(0, 1, (n_per_class, dims)) for c in centres])
    return x, np.repeat(np.arange(classes), n_per_class), centres


def test_mahalanobis_distance_matches_direct_formula():
    from sklearn.covariance import ledoit_wolf

    x, y, _ = _clusters(0)
    model = fit_ood(x, y, x[:30], num_classes=3, normalise=False)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    precision = np.linalg.inv(ledoit_wolf(x - means[y], assume_centered=True)[0])
    query = np.random.default_rng(5).normal(0, 1, (7, 16))
    direct = np.sqrt(np.min([np.einsum("nd,de,ne->n", query - m, precision, query - m) for m in means], axis=0))
    np.testing.assert_allclose(model.distance(query), direct, rtol=1e-6)


def test_in_domain_score_separates_and_round_trips(tmp_path):
    x, y, centres = _clusters(1)
    val, val_y, _ = _clusters(1, n_per_class=40)  # same centres (same seed), fresh noise? same draw: slice instead
    rng = np.random.default_rng(9)
    val = centres[val_y] + 0.3 * rng.normal(0, 1, val.shape)
    model = fit_ood(x, y, val, num_classes=3)
    in_scores = model.score(centres[val_y] + 0.3 * rng.normal(0, 1, val.shape))
    far = model.score(rng.normal(0, 1, (50, 16)) * 3 + 10)
    assert np.mean(in_scores >= IN_DOMAIN_THRESHOLD) > 0.85
    assert np.mean(model.score(val) >= IN_DOMAIN_THRESHOLD) == pytest.approx(0.95, abs=0.01)
    assert (far < IN_DOMAIN_THRESHOLD).all()
    model.save(tmp_path)
    again = OodModel.load(tmp_path)
    np.testing.assert_allclose(again.score(val), model.score(val), atol=1e-5)
    section = model.section(train=len(x), val=len(val))
    assert section["file"] == "ood.npz" and section["dims"] == 16 and section["threshold"] == IN_DOMAIN_THRESHOLD


def _manifest(**extra):
    return Manifest(labels=["cat", "dog"], preprocessing=Preprocessing(size=8, resize=8, mean=(0, 0, 0), std=(1, 1, 1)),
                    backbone="b", source="s", **extra)


def test_manifest_sections_optional_and_checked():
    old = _manifest()
    assert old.calibration is None and old.thresholds is None and old.ood is None and old.temperature == 1.0
    new = parse_manifest({**old.model_dump(mode="json"), "calibration": {"temperature": 1.7},
                          "thresholds": {"cat": 0.4, "dog": 0.6}})
    assert new.temperature == 1.7
    with pytest.raises(ManifestError, match="unknown labels"):
        parse_manifest({**old.model_dump(mode="json"), "thresholds": {"horse": 0.5}})
    with pytest.raises(ManifestError, match="ood.file"):
        parse_manifest({**old.model_dump(mode="json"), "ood": {"dims": 4, "threshold": 0.05,
                                                               "threshold_distance": 1.0, "file": "../x.npz"}})


def test_parse_min_confidence():
    assert parse_min_confidence(None) is None and parse_min_confidence(" ") is None
    assert parse_min_confidence("AUTO") == AUTO and parse_min_confidence("0.25") == 0.25
    for bad in ("high", "1.5", "-0.1", "nan"):
        with pytest.raises(InvalidMinConfidence, match="min_confidence"):
            parse_min_confidence(bad)


def test_decide_abstains_by_number_auto_and_domain():
    manifest = _manifest(thresholds={"cat": 0.8, "dog": 0.3},
                         ood={"dims": 4, "threshold": 0.05, "threshold_distance": 2.0})
    ranked = [{"label": "cat", "probability": 0.7}, {"label": "dog", "probability": 0.3}]
    assert decide(manifest, ranked)["label"] == "cat"
    assert decide(manifest, ranked, 0.6) == {"label": "cat", "probability": 0.7, "abstained": False,
                                             "in_domain": None, "predictions": ranked}
    assert decide(manifest, ranked, 0.75)["abstained"] is True and decide(manifest, ranked, 0.75)["label"] is None
    assert decide(manifest, ranked, AUTO, in_domain=0.5)["label"] is None  # cat needs 0.8
    dog = [{"label": "dog", "probability": 0.6}, {"label": "cat", "probability": 0.4}]
    assert decide(manifest, dog, AUTO, in_domain=0.5)["label"] == "dog"
    assert decide(manifest, dog, AUTO, in_domain=0.01)["abstained"] is True  # out of domain
    assert decide(manifest, dog, 0.5, in_domain=0.01)["label"] == "dog"  # a number ignores the domain
    with pytest.raises(InvalidMinConfidence, match="no per-label thresholds"):
        check_supported(AUTO, _manifest(), "m:v1")
