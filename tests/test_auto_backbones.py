"""`strategy: auto` on every backbone of the catalog: what is exported predicts what was fitted.

A cheap head is fitted on the columns `compute_features` gives; the exported graph feeds its head
the model's own `features()`. Where the two differ (MobileNetV3's Linear + Hardswish, ConvNeXt's
LayerNorm before the head) the published model is not the one that was scored. Random weights
(nothing is downloaded), 32 px images, a handful per class.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.data.datasets import Sample
from models.serving.preprocess import prepare, stack
from training.auto import compute_features, predict, run_auto
from training.backbone_zoo import get_backbone, list_backbones
from training.config import TrainConfig

LABELS = ["red", "blue"]


def write_colours(root, per_class: int, seed: int) -> list[Sample]:
    """Noisy red or blue squares: separable on any backbone's features, random weights included."""
    rng = np.random.default_rng(seed)
    samples = []
    for channel, label in ((0, "red"), (2, "blue")):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
            image[..., channel] = rng.integers(150, 256, (32, 32), dtype=np.uint8)
            path = root / label / f"{i}.png"
            Image.fromarray(image).save(path)
            samples.append(Sample(path, label))
    return samples


def head_logits(result, features) -> np.ndarray:
    """The published head applied to the val columns it was fitted on (numpy side of the check)."""
    classifier = result.built.model.classifier
    x = torch.from_numpy(features.val_x)
    if result.strategy == "multidepth":
        x = (x - classifier.mean) / classifier.scale
    else:
        x = x[:, -features.embedding_dim:]
    with torch.no_grad():
        return classifier.head(x).numpy()


# Lite1 and Lite2 are Lite0's builder at another width and depth (training/backbone_zoo.py registers the three
# in one loop): the same stages and head, so the same columns; skipping them keeps the suite under 25 minutes.
SAME_CODE_AS_LITE0 = {"efficientnet_lite1", "efficientnet_lite2"}


@pytest.mark.slow
@pytest.mark.parametrize("backbone", [name for name in list_backbones() if name not in SAME_CODE_AS_LITE0])
def test_auto_exports_what_it_fitted(backbone, tmp_path):
    import onnxruntime as ort

    from training.export import export_onnx

    size = max(32, get_backbone(backbone).size_multiple)
    splits = {"train": write_colours(tmp_path / "train", 4, 0), "val": write_colours(tmp_path / "val", 3, 1),
              "test": []}
    config = TrainConfig(name="colours", source=backbone, weights="none", data=str(tmp_path / "train"),
                         image_size=size, epochs=1, batch_size=8, budget_s=5.0, output_dir=str(tmp_path / "run"),
                         augment=False)
    torch.manual_seed(0)
    result = run_auto(config, splits, LABELS)
    path = tmp_path / "model.onnx"
    export_onnx(result.built.model, path, size)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = stack([prepare(s.path, result.built.preprocessing) for s in splits["val"]])
    logits, embedding = session.run(["logits", "embedding"], {"image": images})
    torch_predicted = predict(result.built.model, splits["val"], LABELS, result.built.preprocessing)
    assert (logits.argmax(1) == torch_predicted).all()
    if result.strategy == "full":  # no cached features: the trained network is what is exported
        return
    # the checkpoint keeps the source's body: its features are the columns the cheap heads were fitted on
    _, features, _ = compute_features(result.checkpoint, splits, LABELS, config, None)
    assert features.embedding_dim == embedding.shape[1]
    np.testing.assert_allclose(embedding, features.val_x[:, -features.embedding_dim:], rtol=1e-3, atol=1e-3)
    fitted = head_logits(result, features)
    np.testing.assert_allclose(logits, fitted, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(fitted).max())))
    truth = np.array([LABELS.index(s.label) for s in splits["val"]])
    assert (logits.argmax(1) == truth).mean() == (fitted.argmax(1) == truth).mean()
