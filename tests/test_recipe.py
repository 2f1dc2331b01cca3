"""Defaults that fit the data: the decisions (torch-free) and one training run that uses them."""
import numpy as np
import pytest
from PIL import Image

from models.data.datasets import load_samples
from models.transfer.recipe import DataStats, data_stats, fit_augmentation, fit_budget, fit_image_size


def write_images(root, mode, sizes, colour=True):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            pixels = rng.integers(0, 256, (h, w, 3) if colour else (h, w), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / label / f"{i}.png")
    return load_samples(root)


@pytest.mark.parametrize("median,default,expected", [(128, 224, 128), (140, 224, 128), (150, 224, 160), (500, 224, 320), (300, 224, 288),
                                                     (8, 224, 96), (64, 224, 96), (100, 32, 32)])
def test_image_size_is_the_median_shorter_side_rounded_to_32_within_bounds(median, default, expected):
    # tiny images are upsampled to 96 px: a stride-32 backbone's last feature map stays 3×3, not 1×1
    size, why = fit_image_size(DataStats(10, median, 0.0), default)
    assert size == expected and f"median shorter side {median}px" in why


def test_stats_read_the_shorter_side_and_tell_scans_from_photos(tmp_path):
    photos = data_stats(write_images(tmp_path / "photos", "RGB", [(120, 90), (200, 100), (64, 300)]))
    assert photos.median_short_side == 90 and photos.grayscale_share == 0.0
    scans = data_stats(write_images(tmp_path / "scans", "L", [(64, 64)] * 3, colour=False))
    assert scans.median_short_side == 64 and scans.grayscale_share == 1.0
    grey_rgb = data_stats(write_images(tmp_path / "grey", "RGB", [(40, 40)] * 3, colour=False))
    assert grey_rgb.grayscale_share == 1.0  # grey pixels saved as RGB are still scans


def test_augmentation_never_mirrors_scans():
    hflip, scale, why = fit_augmentation(DataStats(10, 64, 1.0))
    assert (hflip, scale) == (False, 0.85) and "no flips" in why
    hflip, scale, why = fit_augmentation(DataStats(10, 64, 0.2))
    assert (hflip, scale) == (True, 0.5) and "flips" in why


def test_budget_sets_epochs_or_falls_back_to_linear():
    epochs, strategy, why = fit_budget(120, step_s=0.5, steps_per_epoch=40, eval_s=2.0, fixed_s=20.0, max_epochs=15)
    assert (epochs, strategy) == (3, "full") and "22.0s per epoch" in why  # (102 - 20) // 22
    assert fit_budget(10_000, 0.5, 40, 2.0, 20.0, 15)[:2] == (15, "full")
    epochs, strategy, why = fit_budget(30, step_s=2.0, steps_per_epoch=40, eval_s=5.0, fixed_s=20.0, max_epochs=15)
    assert strategy == "linear" and "not one full epoch fits" in why


@pytest.mark.slow
def test_training_without_size_or_flips_uses_the_fitted_recipe(tmp_path, bento_home):
    from models.artifact import store
    from training.config import TrainConfig
    from training.pipeline import run
    from training.progress import Progress

    write_images(tmp_path / "data", "L", [(40, 40)] * 8, colour=False)
    events = []
    config = TrainConfig(name="scans", source="simple_cnn", weights="none", data=str(tmp_path / "data"), epochs=1,
                         batch_size=4, output_dir=str(tmp_path / "run"), budget_s=600, int8=False, strategy="full")
    run(config, Progress(events.append))
    recipe = next(e["recipe"] for e in events if e["event"] == "recipe")
    first_training = next(i for i, e in enumerate(events) if e.get("phase") == "training")
    assert events.index(next(e for e in events if e["event"] == "recipe")) < first_training  # shown before training
    assert recipe["image_size"] == 32 and recipe["hflip"] is False and recipe["crop_scale"] == 0.85
    assert recipe["strategy"] == "full" and 1 <= recipe["epochs"] <= 15 and "measured" in recipe["why"]["budget"]
    manifest = store.resolve("scans").manifest()
    assert manifest.preprocessing.size == 32 and {k: manifest.recipe[k] for k in recipe} == recipe
    assert manifest.training["epochs"] == recipe["epochs"]


def test_job_status_shows_the_recipe_before_training():
    from service.finetune.runner import JobTrace

    trace = JobTrace(progress={})
    recipe = {"image_size": 64, "hflip": False, "why": {"image_size": "median shorter side 64px"}}
    assert trace.apply([{"event": "phase", "phase": "loading"}, {"event": "recipe", "recipe": recipe}])
    assert trace.progress["recipe"] == recipe and trace.phase == "loading"


def test_small_datasets_get_more_epochs():
    from models.transfer.recipe import fit_epochs

    assert fit_epochs(1257, 32)[0] == 5  # 40 steps per epoch
    assert fit_epochs(50, 32)[0] == 30  # 2 steps per epoch: capped at 30
    epochs, why = fit_epochs(100_000, 32)
    assert epochs == 3 and "3125 steps per epoch" in why
