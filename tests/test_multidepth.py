"""The multi-depth head and `strategy: auto`: exact fitting, ONNX parity, and auto choosing right."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.data.datasets import Sample
from training.auto import run_auto, with_classifier
from training.backbones import build_backbone
from training.config import TrainConfig
from training.multidepth import classifier_for, extract, fit_head, grid_means, pool_stages, row_space, stages_for


def blob_images(count: int, side: str, rng: np.random.Generator, size: int = 64) -> list[np.ndarray]:
    """A bright square in the left or right half, away from the borders (where padding would tell
    positions apart): only the layout tells the classes apart."""
    images = []
    for _ in range(count):
        image = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
        top = int(rng.integers(16, size - 24))
        left = int(rng.integers(12, size // 2 - 12)) + (size // 2 - 4 if side == "right" else 0)
        image[top:top + 8, left:left + 8] = 255
        images.append(image)
    return images


def write_blobs(root, per_class: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    for side in ("left", "right"):
        (root / side).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(blob_images(per_class, side, rng)):
            path = root / side / f"{i}.png"
            Image.fromarray(image).save(path)
            samples.append(Sample(path, side))
    return samples


def test_grid_means_equal_adaptive_pooling_also_on_odd_sizes():
    x = torch.randn(2, 3, 5, 7)
    expected = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
    assert torch.allclose(grid_means(x, 2), expected, atol=1e-6)


def test_row_space_fit_predicts_like_the_full_fit():
    from training.multidepth import fit_logistic

    rng = np.random.default_rng(0)
    z = rng.normal(size=(30, 400))
    y = (z[:, 0] + z[:, 1] > 0).astype(int) + (z[:, 2] > 1)
    probe = rng.normal(size=(50, 400))
    _, full_coef, full_b = fit_logistic(z, y, 0.1, True, None)
    _, small_coef, small_b = fit_logistic(z, y, 0.1, True, row_space(z))
    small, full = probe @ small_coef.T + small_b, probe @ full_coef.T + full_b
    np.testing.assert_allclose(small, full, atol=1e-2)  # the same optimum, up to the solvers' tolerance
    assert (small.argmax(1) == full.argmax(1)).all()


def test_fit_head_keeps_the_c_that_scores_best_on_val_and_covers_unseen_classes():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 4))
    y = (x[:, 0] > 0).astype(int)  # classes 0 and 1 only; class 2 never appears
    head = fit_head(x[:50], y[:50], x[50:], y[50:], num_classes=3, c_values=(1e-4, 1.0))
    assert head.weight.shape == (3, 4) and head.c == 1.0 and head.val["macro_f1"] > 0.85  # 1e-4 underfits
    assert (head.probabilities(x)[:, 2] < 1e-6).all()  # a class never seen is never predicted
    assert (np.argmax(head.logits(x), 1) == y).mean() > 0.9


@pytest.mark.slow
def test_multidepth_graph_matches_its_numpy_reference(tmp_path):
    """ONNX Runtime on the exported graph == the numpy head on the torch stage features."""
    import onnxruntime as ort

    from training.export import export_onnx

    torch.manual_seed(0)
    built = build_backbone("simple_cnn", 2, weights="none", image_size=64)
    stages = stages_for(built.model.classifier.body)
    rng = np.random.default_rng(0)
    images = np.stack(blob_images(12, "left", rng) + blob_images(12, "right", rng))
    targets = np.array([0] * 12 + [1] * 12)
    batches = [(torch.from_numpy(images), targets)]
    features, _ = extract(stages, built.model.normalise, batches)
    head = fit_head(features[:16:2].repeat(1, 0), targets[:16:2], features[1::2], targets[1::2], 2)
    model = with_classifier(built, classifier_for(stages, head, built.model.classifier.blocks)).model
    path = tmp_path / "model.onnx"
    export_onnx(model, path, 64)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities, embedding = session.run(["probabilities", "embedding"], {"image": images})
    np.testing.assert_allclose(probabilities, head.probabilities(features), atol=1e-4)
    assert features.shape[1] == pool_stages([torch.zeros(1, c, 4, 4) for c in (16, 32, 64)]).shape[1]
    # the exported embedding is the source's usual one: the last stage's global mean (the last columns)
    np.testing.assert_allclose(embedding, features[:, -64:], atol=1e-4)


@pytest.mark.slow
def test_auto_picks_multidepth_where_only_the_layout_tells_classes_apart(tmp_path):
    """Globally pooled last-layer features cannot tell a left blob from a right one; gridded earlier
    stages can. auto must find that on val, choose multidepth, and record both candidates."""
    torch.manual_seed(0)
    train = write_blobs(tmp_path / "train", 24, seed=0)
    val = write_blobs(tmp_path / "val", 8, seed=1)
    test = write_blobs(tmp_path / "test", 20, seed=2)
    labels = ["left", "right"]
    config = TrainConfig(name="blobs", source="simple_cnn", weights="none", data=str(tmp_path / "train"),
                         image_size=64, output_dir=str(tmp_path / "run"), budget_s=5.0)
    result = run_auto(config, {"train": train, "val": val, "test": test}, labels)
    scores = {c["strategy"]: c["val"]["macro_f1"] for c in result.candidates}
    assert set(scores) == {"prototype", "logistic", "multidepth"}  # a 5 s budget leaves no room for a fine-tune
    assert result.strategy == "multidepth" and scores["multidepth"] > max(scores["logistic"], scores["prototype"])
    model = result.built.model.eval()
    with torch.no_grad():
        x = torch.from_numpy(np.stack([np.asarray(Image.open(s.path).convert("RGB")) for s in test]))
        predicted = model(x)[0].argmax(1).numpy()
    truth = np.array([labels.index(s.label) for s in test])
    assert (predicted == truth).mean() >= 0.9
    assert result.checkpoint is not None and result.checkpoint.model.classifier.head.in_features == 64
