"""Export-time trust fitting on a real (tiny, torch-free) ONNX version, and what evaluation reports."""
import json

import numpy as np
import onnx
import pytest

from models.serving import calibration as cal
from models.data.evaluate import evaluate, run_samples
from models.artifact.manifest import read_manifest
from models.serving.ood import IN_DOMAIN_THRESHOLD
from models.serving.preprocess import stack
from models.serving.runtime import OnnxClassifier
from tests.tiny import noisy_colour_samples, tiny_graph, write_tiny_model, write_trusted_tiny_model


@pytest.fixture(scope="module")
def trusted(tmp_path_factory):
    root = tmp_path_factory.mktemp("trusted")
    write_trusted_tiny_model(root / "model", root / "data")
    return root


def _solid(rgb, size=16):
    return np.full((1, size, size, 3), rgb, np.uint8)


def test_export_writes_sections_and_bakes_temperature(trusted):
    manifest = read_manifest(trusted / "model")
    assert manifest.calibration is not None and manifest.calibration.samples == 90
    temperature = manifest.temperature
    assert temperature != pytest.approx(1.0, abs=0.05)  # the tiny head is mis-scaled on purpose
    assert set(manifest.thresholds) == {"red", "green", "blue"}
    assert manifest.ood.file == "ood.npz" and (trusted / "model" / "ood.npz").is_file()
    assert manifest.ood.threshold == IN_DOMAIN_THRESHOLD and manifest.ood.fitted_on == {"train": 120, "val": 90}

    model = OnnxClassifier(trusted / "model", "tiny", "1").load()
    batch = stack([_solid((200, 90, 40))[0], _solid((30, 60, 220))[0]])
    logits, probabilities = model.run(batch, ["logits", "probabilities"])
    uncalibrated = tiny_graph(3)
    expected_logits = batch.astype(np.float32).mean(axis=(1, 2)) @ onnx.numpy_helper.to_array(uncalibrated.graph.initializer[1])
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5)  # logits unchanged
    np.testing.assert_allclose(probabilities, cal.softmax(logits, temperature), atol=1e-6)


def test_temperature_is_the_val_nll_minimum(trusted):
    model = OnnxClassifier(trusted / "model", "tiny", "1").load()
    val = noisy_colour_samples(trusted / "data" / "val", 30, seed=2)
    out, kept, _ = run_samples(model, val, ["logits"])
    labels = np.array([["red", "green", "blue"].index(val[i].label) for i in kept])
    fitted = model.manifest.temperature
    for other in (fitted * 0.8, fitted * 1.25):
        assert cal.nll_of_logits(out["logits"], labels, fitted) < cal.nll_of_logits(out["logits"], labels, other)


def test_in_domain_score_in_one_pass(trusted):
    model = OnnxClassifier(trusted / "model", "tiny", "1").load()
    probabilities, scores = model.predict_scored(stack([_solid((220, 40, 60))[0], _solid((250, 250, 0))[0]]))
    assert probabilities.shape == (2, 3)
    assert scores[0] >= IN_DOMAIN_THRESHOLD > scores[1]  # reddish is typical; yellow (two channels high) never occurs


def test_eval_report_has_calibration_auto_and_in_domain(trusted, tmp_path):
    model = OnnxClassifier(trusted / "model", "tiny", "1").load()
    test = noisy_colour_samples(tmp_path / "test", 30, seed=3)
    report = evaluate(model, test)
    calibration = report["calibration"]
    assert calibration["temperature"] == model.manifest.temperature
    assert calibration["after"]["nll"] < calibration["before"]["nll"]
    assert len(calibration["after"]["reliability"]) == 15
    assert sum(b["count"] for b in calibration["after"]["reliability"]) == 90
    assert 0.8 < report["in_domain"]["share_in_domain"] <= 1.0
    auto = report["auto"]
    assert 0 < auto["coverage"] <= auto["confidence_only"]["coverage"] <= 1.0
    assert auto["accuracy"] >= report["accuracy"]  # abstaining drops the doubtful ones
    coverage = [row["coverage"] for row in report["risk_coverage"]]
    assert coverage == sorted(coverage, reverse=True) and coverage[0] == 1.0
    json.dumps(report)  # eval.json must serialise


def test_versions_without_sections_still_evaluate(tmp_path):
    write_tiny_model(tmp_path / "old")
    model = OnnxClassifier(tmp_path / "old", "old", "1").load()
    assert model.ood is None and model.manifest.temperature == 1.0
    probabilities, scores = model.predict_scored(_solid((250, 0, 0)))
    assert scores is None and probabilities.argmax() == 0
    report = evaluate(model, noisy_colour_samples(tmp_path / "test", 5, seed=4))
    before, after = report["calibration"]["before"], report["calibration"]["after"]
    assert all(before[key] == pytest.approx(after[key], abs=1e-6) for key in ("ece", "nll", "brier"))
    assert "auto" not in report and "in_domain" not in report


def test_ood_sample_keeps_each_class_share_and_small_sets_whole(tmp_path):
    from models.data.datasets import Sample
    from models.serving.trust import ood_sample

    train = [Sample(tmp_path / f"{i}.png", "a" if i < 900 else "b") for i in range(1000)]
    kept = ood_sample(train, limit=100)
    assert len(kept) == 100 and sum(s.label == "b" for s in kept) == 10
    assert len({s.path for s in kept}) == 100
    assert ood_sample(train, limit=5000) is train


def test_calibration_reports_val_then_sampled_train_images(tmp_path, monkeypatch):
    from models.serving import trust

    write_tiny_model(tmp_path / "model", labels=("red", "green", "blue"), embedding=True)
    train = noisy_colour_samples(tmp_path / "train", 40, seed=1, labels=("red", "green", "blue"))
    val = noisy_colour_samples(tmp_path / "val", 30, seed=2, labels=("red", "green", "blue"))
    monkeypatch.setattr(trust.ood_sample, "__defaults__", (60,))
    seen = []
    manifest = trust.calibrate_version(tmp_path / "model", "tiny", train, val, on_images=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (len(val) + 60, len(val) + 60)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and manifest.ood.fitted_on["train"] == 60
