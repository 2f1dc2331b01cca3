"""Evidence maps in the exported graph: exact per head type (sum of a class's map = logit − bias), and
the heads that are not linear over pooled maps export none and say why."""
from __future__ import annotations

import numpy as np
import torch

from training.auto import NormalisedLinear, with_classifier
from training.backbones import Classifier, build_backbone
from training.evidence import EVIDENCE_TOLERANCE, area_matrix, cell_masks, evidence_error, explained
from training.multidepth import classifier_for, extract, fit_head, grid_means, stages_for

SIZE = 40  # odd map sizes on the way (40 → 20 → 10 → 5): cells overlap, resampling is not an integer factor


def images(count: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)


def simple(num_classes: int = 3):
    torch.manual_seed(0)
    return build_backbone("simple_cnn", num_classes, weights="none", image_size=SIZE)


def exported(tmp_path, built):
    """Export through the real path; (manifest evidence section, ONNX logits, evidence, torch bias)."""
    import onnxruntime as ort

    from training.export import export_explained

    path = tmp_path / "model.onnx"
    _, section = export_explained(built, path, images())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return section, session, names


def assert_exact(built, tmp_path):
    section, session, names = exported(tmp_path, built)
    assert section.available and names[-1] == "evidence", section.reason
    model, _ = explained(built.model, SIZE, images())
    probe = images(5, seed=7)  # images the export check never saw
    logits, evidence = session.run(["logits", "evidence"], {"image": probe})
    assert evidence.shape == (5, logits.shape[1], section.side, section.side)
    sums = evidence.astype(np.float64).sum((2, 3))
    np.testing.assert_allclose(sums, logits - model.evidence.bias.numpy(), atol=EVIDENCE_TOLERANCE)
    torch_logits = built.model(torch.from_numpy(probe))[0].detach().numpy()
    np.testing.assert_allclose(logits, torch_logits, atol=1e-4)  # the graph still answers like the model
    return section, evidence


def test_area_resampling_keeps_every_columns_mass_and_cell_masks_match_grid_means():
    for fine, coarse in ((10, 5), (7, 3), (3, 7), (56, 5)):
        np.testing.assert_allclose(area_matrix(fine, coarse).sum(0).numpy(), 1.0, atol=1e-6)
    x = torch.randn(2, 4, 5, 7)
    via_masks = torch.einsum("ndhw,khw->ndk", x, cell_masks(5, 7, 2)).flatten(1)
    assert torch.allclose(via_masks, grid_means(x, 2), atol=1e-6)


def test_last_layer_linear_head_is_exact(tmp_path):
    built = simple()
    section, evidence = assert_exact(built, tmp_path)
    assert section.side == 5  # the last stage's resolution: 40 px / 8


def test_prototype_head_is_exact(tmp_path):
    built = simple()
    classifier = built.model.classifier
    rng = np.random.default_rng(1)
    head = NormalisedLinear(rng.normal(size=(3, 64)).astype(np.float32), rng.normal(size=3).astype(np.float32))
    assert_exact(with_classifier(built, Classifier(classifier.body, head, classifier.blocks)), tmp_path)


def test_multidepth_head_is_exact_and_at_the_finest_stage(tmp_path):
    built = simple(2)
    stages = stages_for(built.model.classifier.body)
    x = images(12, seed=3)
    y = np.array([0, 1] * 6)
    features, _ = extract(stages, built.model.normalise, [(torch.from_numpy(x), y)])
    head = fit_head(features[:8], y[:8], features[8:], y[8:], 2)
    multi = with_classifier(built, classifier_for(stages, head, built.model.classifier.blocks))
    section, evidence = assert_exact(multi, tmp_path)
    assert section.side == 20  # the first stage's resolution (40 px / 2)


def test_heads_that_are_not_linear_over_pooled_maps_export_no_evidence_and_say_why(tmp_path):
    built = simple()
    classifier = built.model.classifier
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    section, _, names = exported(tmp_path, with_classifier(built, Classifier(classifier.body, mlp, classifier.blocks)))
    assert not section.available and "not linear" in section.reason
    assert names == ["logits", "probabilities", "embedding"]
    # a body with a non-linear layer between pooling and head (as MobileNetV3's Linear + Hardswish)
    body = classifier.body
    body.flatten = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Hardswish())
    model, reason = explained(built.model, SIZE, images())
    assert model is None and "sum to the logits" in reason


def test_evidence_error_is_relative_to_the_logit_scale():
    logits = np.array([[100.0, -50.0]])
    evidence = np.zeros((1, 2, 2, 2))
    evidence[0, 0, 0, 0], evidence[0, 1, 1, 1] = 99.0, -50.0
    assert evidence_error(logits, evidence, np.array([1.0, 0.0])) == 0.0
    evidence[0, 0, 0, 0] += 0.01
    assert abs(evidence_error(logits, evidence, np.array([1.0, 0.0])) - 0.01 / 99.0) < 1e-12
