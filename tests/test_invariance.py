"""Invariances measured from the data (training/invariance.py) and partial fine-tunes on a cached trunk
(training/trunk.py): known answers both ways, equality with the uncached loop, the deadline."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.data.datasets import Sample
from training.invariance import ELEMENTS, ViewAveraged, apply_view, decide, group_of


def blob_batch(count: int, rng: np.random.Generator, kind: str, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images and labels. 'side': a blob in the left (0) or right (1) half, anywhere up and
    down (a mirror swaps the classes, an up-down flip does not). 'count': one blob (0) or two (1)
    anywhere (every flip and turn keeps the class)."""
    images, labels = np.zeros((count, size, size, 3), np.uint8), rng.integers(0, 2, count)
    for image, label in zip(images, labels):
        blobs = 1 + int(label) if kind == "count" else 1
        for _ in range(blobs):
            top = int(rng.integers(2, size - 8))
            left = int(rng.integers(2, size - 8)) if kind == "count" else \
                int(rng.integers(2, size // 2 - 8)) + (size // 2 if label else 0)
            image[top:top + 6, left:left + 6] = 255
    return images, labels


def pooled(images: np.ndarray) -> np.ndarray:
    """4×4-cell means of the first channel: a feature map that knows where things are."""
    x = images[..., 0].astype(float).reshape(len(images), 8, 4, 8, 4).mean((2, 4))
    return x.reshape(len(images), -1)


def measured(kind: str):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    train_x, train_y = blob_batch(300, rng, kind)
    val_x, val_y = blob_batch(200, rng, kind)
    head = LogisticRegression(C=1.0, max_iter=2000).fit(pooled(train_x), train_y)
    views = {v: pooled(apply_view(torch.from_numpy(val_x), v).numpy()) for v in ("identity", "hflip", "vflip", "rot90")}
    return decide(head.predict, views, val_y)


def test_a_mirror_that_swaps_the_classes_is_refused_and_an_up_down_flip_kept():
    decision = measured("side")
    assert decision.kept == ["vflip"] and decision.views == ["identity", "vflip"]
    assert decision.scores["hflip"] < 0.2 and "hflip changes the label" in decision.why


def test_orientation_free_classes_keep_every_flip_and_turn():
    decision = measured("count")
    assert decision.kept == ["hflip", "vflip", "rot90"] and decision.views == list(ELEMENTS)


def test_views_form_the_square_symmetry_group():
    x = torch.arange(2 * 5 * 5 * 3).reshape(2, 5, 5, 3)
    assert torch.equal(apply_view(x, "vflip"), x.flip(1)) and torch.equal(apply_view(x, "hflip"), x.flip(2))
    assert torch.equal(apply_view(apply_view(x, "rot90"), "rot270"), x)
    assert torch.equal(apply_view(apply_view(x, "hflip"), "vflip"), apply_view(x, "rot180"))
    assert torch.equal(apply_view(x, "transpose"), x.transpose(1, 2))
    assert len({apply_view(x, v).numpy().tobytes() for v in ELEMENTS}) == 8
    assert group_of([]) == ["identity"] and group_of(["hflip", "vflip"]) == ["identity", "hflip", "vflip", "rot180"]


def test_training_crops_turn_and_mirror_into_the_squares_eight_symmetries():
    """`turns` with `hflip`: over many draws every one of the 8 views of a marked square appears, and
    nothing else (no other angle, no resampling of the pixels); without `turns` only the two mirrors."""
    import random

    from models.artifact.manifest import Preprocessing
    from training.data import random_resized_crop

    image = np.zeros((8, 8, 3), np.uint8)
    image[0, 1], image[2, 0] = 255, 128  # an asymmetric mark: each of the 8 views is distinct
    spec = Preprocessing(size=8, resize=8, interpolation="nearest", mean=(0, 0, 0), std=(1, 1, 1))
    views = {name: apply_view(torch.from_numpy(image)[None], name)[0].numpy().tobytes() for name in ELEMENTS}
    assert len(set(views.values())) == 8

    def seen(turns: bool) -> set[str]:
        rng, names = random.Random(0), {v: k for k, v in views.items()}
        crops = [random_resized_crop(Image.fromarray(image), spec, rng, hflip=True, scale=(1, 1), ratio=(1, 1),
                                     turns=turns).tobytes() for _ in range(200)]
        assert all(crop in names for crop in crops)  # a symmetry of the square, pixel for pixel
        return {names[crop] for crop in crops}

    assert seen(True) == set(ELEMENTS)
    assert seen(False) == {"identity", "hflip"}


def test_the_full_fine_tune_augments_with_the_measured_invariances_only():
    from training.auto import augmented
    from training.config import TrainConfig

    config = TrainConfig(name="t", data="/tmp", hflip=False)
    every = augmented(config, ["hflip", "vflip", "rot90"])
    assert every.hflip is True and every.turns is True
    assert augmented(config, ["vflip"]).turns is False and augmented(config, ["vflip"]).hflip is False
    assert augmented(config.replace(turns=False), ["hflip", "rot90"]).turns is False  # the user's word stands
    assert augmented(config, []) == config.replace(turns=False)


def test_averaging_over_the_whole_group_makes_the_classifier_invariant():
    from training.backbones import build_backbone

    torch.manual_seed(0)
    classifier = build_backbone("simple_cnn", 3, weights="none", image_size=32).model.classifier.eval()
    averaged = ViewAveraged(classifier, list(ELEMENTS)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = averaged(x)
        for view in ELEMENTS:
            torch.testing.assert_close(averaged(apply_view(x, view, (2, 3))), reference, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(classifier(apply_view(x, "rot90", (2, 3))), classifier(x), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# The cached trunk.


def write_images(root, count: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    images, labels = blob_batch(count, rng, "side")
    samples = []
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
        samples.append(Sample(folder / f"{i}.png", str(label)))
    return samples


def cached_run(config, splits, labels, deadline=None):
    from training.data import ImageDataset
    from training.backbones import build_source
    from training.train import seed_everything
    from training.trunk import Cached, split_for, train_tail, trunk_outputs

    seed_everything(config.seed)  # as train() does before it builds the model
    built = build_source(config, len(labels), labels)
    split = split_for(built.model, config.partial_blocks)
    rows = {}
    for name in ("train", "val"):
        dataset = ImageDataset(splits[name], labels, built.preprocessing, train=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=8)
        rows[name] = (trunk_outputs(built.model, split, loader, lambda x: x, torch.device("cpu")),
                      torch.tensor(dataset.targets))
    cached = Cached(*rows["train"], *rows["val"])
    return built, train_tail(built.model, split, cached, config, len(labels), deadline)


@pytest.mark.parametrize("balance", ["loss", "sampler"])
def test_the_cached_trunk_trains_the_tail_as_the_uncached_loop_does(tmp_path, balance):
    from training.config import TrainConfig
    from training.train import train

    splits = {"train": write_images(tmp_path / "train", 40, 0), "val": write_images(tmp_path / "val", 12, 1), "test": []}
    labels = ["0", "1"]
    config = TrainConfig(name="t", source="simple_cnn", weights="none", data=str(tmp_path), image_size=32, epochs=3,
                         batch_size=8, strategy="partial", partial_blocks=1, augment=False, class_balance=balance,
                         output_dir=str(tmp_path / "run"), learning_rate=1e-2, backbone_lr_scale=0.5)
    uncached = train(config, splits, labels)
    built, result = cached_run(config, splits, labels)
    assert result.epochs_run == 3 and result.best_epoch == uncached.best_epoch
    for (name, expected), actual in zip(uncached.built.model.state_dict().items(), built.model.state_dict().values()):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4, msg=name)
    frozen = dict(uncached.built.model.named_parameters())["classifier.body.features.0.0.weight"]
    assert not frozen.requires_grad  # only the last stage and the head learned


def test_the_deadline_is_a_hard_stop_that_keeps_the_best_epoch(tmp_path):
    from training.config import TrainConfig
    from training.trunk import Deadline

    splits = {"train": write_images(tmp_path / "train", 40, 0), "val": write_images(tmp_path / "val", 12, 1)}
    config = TrainConfig(name="t", source="simple_cnn", weights="none", data=str(tmp_path), image_size=32, epochs=50,
                         batch_size=8, strategy="partial", partial_blocks=1, output_dir=str(tmp_path / "run"))
    ticks = iter(range(10**6))
    deadline = Deadline(12, clock=lambda: float(next(ticks)))  # every look at the clock costs a "second"
    _, result = cached_run(config, splits, ["0", "1"], deadline)
    assert result.stopped_by == "deadline" and 1 <= result.epochs_run < 50
    assert 1 <= result.best_epoch <= result.epochs_run
