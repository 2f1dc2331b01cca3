"""Heads and features at scale: the streamed logistic head equals the in-memory one on a small problem,
and the feature pass on ONNX Runtime writes what torch computes, into float16, trunk included."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training import streaming
from training.backbones import build_backbone
from training.feature_pass import Tap, feature_pass, make_runner, trunk_index
from training.multidepth import extract, fit_fixed, fit_head, stages_for, standardiser
from training.trunk import split_for


def problem(classes: int, rows: int = 600, columns: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    y[:40] = 0  # unequal classes: the balanced weights matter
    x = rng.normal(size=(rows, columns)) + y[:, None] * rng.normal(size=columns) * 0.3
    return x.astype(np.float16), y


def objective(weight, bias, z, y, c, balanced, classes):
    logits = z @ weight[:classes].T + bias[:classes]
    logits -= logits.max(1, keepdims=True)
    loss = np.log(np.exp(logits).sum(1)) - logits[np.arange(len(y)), y]
    penalty = 1.0 if classes == 2 else 0.5  # two classes: ±w/2 rows, the binary model's ½‖w‖²
    return penalty * (weight[:classes] ** 2).sum() + c * (streaming.sample_weights(y, classes, balanced) * loss).sum()


@pytest.mark.parametrize("classes,balanced", [(4, True), (2, True), (3, False)])
def test_streamed_head_equals_the_in_memory_one(classes, balanced):
    x, y = problem(classes)
    mean, scale = streaming.moments(x, chunk=100)
    exact_mean, exact_scale = standardiser(x.astype(np.float32))
    np.testing.assert_allclose(mean, exact_mean, atol=1e-5)
    np.testing.assert_allclose(scale, exact_scale, rtol=1e-4)
    in_memory = fit_fixed(x.astype(np.float32), y, 0.1, classes + 1, balanced)  # one class never seen
    weight, bias, info = streaming.fit_streaming(x, y, 0.1, classes + 1, balanced, mean, scale, chunk=128)
    z = (x.astype(np.float64) - mean) / scale
    assert (np.argmax(z @ weight.T + bias, 1) == in_memory.logits(x).argmax(1)).all()
    np.testing.assert_allclose(weight, in_memory.weight, atol=0.02 * np.abs(in_memory.weight).max())
    assert bias[classes] == -1e4 and not weight[classes].any()  # the unseen class is never predicted
    # the same objective, minimised at least as well as scikit-learn's lbfgs (its tolerance is looser)
    ours = objective(weight, bias, z, y, 0.1, balanced, classes)
    theirs = objective(in_memory.weight.astype(np.float64), in_memory.bias.astype(np.float64), z, y, 0.1, balanced,
                       classes)
    assert ours <= theirs * (1 + 1e-6), (ours, theirs)
    assert info["evaluations"] > 1


def test_large_problems_stream_without_refitting_on_val(monkeypatch):
    monkeypatch.setattr(streaming, "STREAM_ABOVE", 1000)
    x, y = problem(3, rows=400)
    head = fit_head(x[:300], y[:300], x[300:], y[300:], 3, c_values=(0.03, 0.3))
    assert not head.refitted and head.c in (0.03, 0.3) and head.val["macro_f1"] > 0.5
    small = fit_fixed(x[:300].astype(np.float32), y[:300], head.c, 3)  # the train rows only, in memory
    assert (head.logits(x[300:]).argmax(1) == small.logits(x[300:]).argmax(1)).mean() >= 0.97


@pytest.mark.parametrize("use_ort", [True, False])
def test_feature_pass_writes_what_torch_computes(use_ort):
    torch.manual_seed(0)
    built = build_backbone("simple_cnn", 2, weights="none", image_size=64)
    stages = stages_for(built.model.classifier.body)
    split = split_for(built.model, 2)
    tap = Tap(built.model.normalise, stages, trunk_index(stages, split.last_frozen))
    images = np.random.default_rng(0).integers(0, 255, (10, 64, 64, 3), dtype=np.uint8)
    batches = [(torch.from_numpy(images[:6]), np.zeros(6)), (torch.from_numpy(images[6:]), np.ones(4))]
    runner = make_runner(tap, torch.from_numpy(images[:2]), torch.device("cpu"), use_ort=use_ort)
    assert runner.engine == ("onnxruntime" if use_ort else "torch")
    done = feature_pass(runner, batches, 10)
    expected, targets = extract(stages, built.model.normalise, batches)
    assert done.features.dtype == np.float32  # small: float32 (large: float16)
    assert done.targets.tolist() == targets.tolist()
    np.testing.assert_allclose(done.features.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    with torch.no_grad():
        trunk = split.trunk(built.model.normalise(torch.from_numpy(images)))
    np.testing.assert_allclose(done.trunk.float().numpy(), trunk.numpy(), rtol=1e-3, atol=1e-4)


def test_features_are_float16_only_where_heads_stream_and_widen_before_overflow():
    from training.feature_pass import widened, feature_dtype
    from training.streaming import STREAM_ABOVE

    assert feature_dtype(60_000, 10_320) == np.float16 and feature_dtype(100, 10_320) == np.float32
    assert STREAM_ABOVE < 60_000 * 10_320
    buffer = np.zeros((4, 3), np.float16)
    assert widened(buffer, np.full((2, 3), 100.0)) is buffer  # in range: the same float16 array
    wide = widened(buffer, np.full((2, 3), 1e6))  # would be inf in float16
    assert wide.dtype == np.float32 and wide.shape == (4, 3)


def test_stratified_rows_keep_each_class_share():
    from training.multidepth import stratified_rows

    y = np.array([0] * 900 + [1] * 90 + [2] * 10)
    rows = stratified_rows(y, 100)
    assert len(set(rows.tolist())) == len(rows) and (np.diff(rows) > 0).all()
    assert np.bincount(y[rows]).tolist() == [90, 9, 1]
    assert stratified_rows(y, 5000).tolist() == list(range(1000))
