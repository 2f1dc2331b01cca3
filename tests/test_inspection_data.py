"""The inspection dataset (training/inspection_data.py): seeded, a defective minority, masks that match the
images, real sizes; its demo-data folder and its benchmark targets."""
import csv

import numpy as np
import pytest

from bench.transfer_data import load_target
from models.data.datasets import load_samples
from training.demo_data import write_demo_data
from training.inspection_data import LABELS, SIZE_RANGE, generate, load_picture, read_mask


def same(a, b) -> bool:
    return all(np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask) and x.label == y.label
               and x.box == y.box for x, y in zip(a, b, strict=True))


def test_the_generator_is_deterministic_per_seed_and_split():
    first, again = generate(6, seed=3, variant="grey"), generate(6, seed=3, variant="grey")
    assert same(first, again)
    assert not same(first, generate(6, seed=4, variant="grey"))
    # the test split is drawn on its own: asking for more train images does not change it
    assert same(generate(3, seed=3, split="test"), generate(3, seed=3, split="test"))
    assert {item.split for item in generate(3, seed=3, split="test")} == {"test"}


@pytest.mark.parametrize("variant", ["grey", "colour"])
def test_defective_images_are_a_third_with_masks_exactly_where_defects_are(variant):
    items = generate(12, seed=0, variant=variant)
    labels = [item.label for item in items]
    assert labels.count("defective") == 4 and labels.count("clean") == 8  # the minority, a third
    for item in items:
        height, width = item.image.shape[:2]
        assert SIZE_RANGE[0] <= height <= SIZE_RANGE[1] and SIZE_RANGE[0] <= width <= SIZE_RANGE[1]
        assert item.image.dtype == np.uint8 and item.image.shape[2] == 3
        assert item.mask.shape == (height, width) and item.mask.dtype == bool  # inside the image by shape
        assert item.mask.any() == (item.label == "defective") and bool(item.defects) == item.mask.any()
        assert item.grey == (variant == "grey")
    for item in items:
        if item.label == "defective":  # thin and local: a small part of the image, but not a speck
            assert 30 <= item.mask.sum() <= 0.03 * item.mask.size


def test_a_defect_changes_the_pixels_under_its_mask():
    items = generate(9, seed=1, variant="grey")
    for item in items:
        if item.label == "defective":
            grey = item.image[..., 0].astype(float)
            ring = np.zeros_like(item.mask)  # the pixels 3 px beside the mask: the background it was drawn on
            ys, xs = np.nonzero(item.mask)
            ring[np.clip(ys + 3, 0, ring.shape[0] - 1), xs] = True
            ring &= ~item.mask
            assert abs(grey[item.mask].mean() - grey[ring].mean()) > 5


def test_train_and_test_crops_come_from_different_halves_of_each_photo():
    for split in ("train", "test"):
        for item in generate(6, seed=2, split=split, variant="mixed"):
            height, width = load_picture(item.source).shape[:2]
            top, left, win_h, win_w = item.box
            start, end, side = (top, top + win_h, height) if height >= width else (left, left + win_w, width)
            assert (end <= side // 2) if split == "train" else (start >= side // 2)


def test_demo_data_writes_images_masks_and_manifests_that_load_as_a_dataset(tmp_path):
    written = write_demo_data("inspection", tmp_path / "insp", per_class=4, seed=0)
    assert written["classes"] == list(LABELS) and written["images"] == 12 and written["defective"] == 4
    samples = load_samples(tmp_path / "insp")  # manifest.csv: the masks/ folder is not a class
    assert {s.label for s in samples} == set(LABELS) and {s.split for s in samples} == {"train", "test"}
    with (tmp_path / "insp" / "masks.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    for row in rows:
        assert row["mask"] == f"masks/{row['path']}"
        mask = read_mask(tmp_path / "insp" / row["mask"])
        assert mask.any() == (row["label"] == "defective") and int(row["defect_pixels"]) == mask.sum()
        from PIL import Image

        assert Image.open(tmp_path / "insp" / row["path"]).size[::-1] == mask.shape


def test_benchmark_targets_keep_sizes_masks_and_the_positive_class():
    target = load_target("inspection-grey", 2, seed=0, test_images=6)
    assert target.labels == ["clean", "defective"] and target.positive == "defective"
    assert np.bincount(target.train_y).tolist() == [4, 2] and np.bincount(target.test_y).tolist() == [4, 2]
    assert target.train_x.dtype == object and len({image.shape for image in target.train_x}) > 1
    assert all(mask.any() == bool(y) for mask, y in zip(target.test_masks, target.test_y))
    assert "spatial" in target.shift
    assert load_target("inspection-colour", 1, seed=0, test_images=3).name == "inspection-colour"
