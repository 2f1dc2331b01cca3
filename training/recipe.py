"""Fill the training config's unset fields from the data (models/transfer/recipe.py decides; this measures).

Runs after the split and before training: image size from the images, augmentation from what
they look like, and with `budget_s` the epochs (and strategy) from a few timed training steps.
The chosen recipe is emitted as a progress event (the job shows it before training starts),
saved next to the checkpoints (a resumed run keeps it), and recorded in the manifest.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from models.data.datasets import Sample
from models.jobs.events import Progress
from models.transfer.recipe import Recipe, data_stats, fit_augmentation, fit_budget, fit_epochs, fit_image_size, steps_per_epoch
from training.config import TrainConfig

RECIPE_FILE = "recipe.json"
TIMED_STEPS = 3
MAX_BUDGET_EPOCHS = 15
# export and parity (24-34 s), the in-domain score's fit (1-4 s) and publishing (4 s): bench/scale.py's jobs
# on 2 cores, 1k to 60k images. 20 s (a small model's ~15 s) left INT8 without its reserve at 1k and 60k.
FIXED_SECONDS = 35.0


def source_size(config: TrainConfig) -> int:
    """The source's own input size: the upper bound for a fitted size (upsampling adds no detail)."""
    base, _ = config.source_parts()
    if config.is_registry_source():
        from training.backbone_zoo import get_backbone

        return get_backbone(base).defaults().size
    from models.artifact import store

    return store.resolve(config.source).manifest().preprocessing.size


def time_steps(config: TrainConfig, train: list[Sample], labels: list[str], steps: int = TIMED_STEPS) -> tuple[float, float]:
    """(seconds per training step, seconds per evaluated image), measured on the real model and data."""
    import torch
    import torch.nn.functional as F

    from training.backbones import build_source
    from training.data import ImageDataset, make_loader
    from training.strategies import configure_strategy, set_train_mode
    from training.train import pick_device

    device = pick_device(config.device)
    built = build_source(config, len(labels), labels)
    model = built.model.to(device)
    optimiser = torch.optim.AdamW(configure_strategy(model, config), lr=config.learning_rate)
    dataset = ImageDataset(train, labels, built.preprocessing, train=True, hflip=bool(config.hflip),
                           crop_scale=config.crop_scale or 0.5, seed=config.seed, turns=bool(config.turns))
    loader = make_loader(dataset, config.batch_size, True, num_workers=config.num_workers, seed=config.seed)
    set_train_mode(model)
    times, last, x = [], time.perf_counter(), None
    for x, y in loader:  # includes decoding and augmentation, as training will
        loss = F.cross_entropy(model(x.to(device))[0], y.to(device))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        now = time.perf_counter()
        times.append(now - last)
        last = now
        if len(times) > steps:
            break
    model.eval()
    with torch.no_grad():
        started = time.perf_counter()
        model(x.to(device))
        per_image = (time.perf_counter() - started) / len(x)
    return statistics.median(times[1:] or times), per_image  # the first step pays for warm-up


def choose(config: TrainConfig, splits: dict[str, list[Sample]], labels: list[str]) -> Recipe:
    why, given = {}, []
    stats = data_stats(splits["train"])
    size, why["image_size"] = fit_image_size(stats, source_size(config))
    if config.image_size:
        size, why["image_size"] = config.image_size, "given"
    hflip, crop_scale, why["augmentation"] = fit_augmentation(stats)
    if config.hflip is not None:
        hflip = config.hflip
        given.append("hflip")
    if config.crop_scale is not None:
        crop_scale = config.crop_scale
        given.append("crop_scale")
    given += [name for name in ("image_size", "epochs") if getattr(config, name)]
    epochs, strategy = config.epochs, config.strategy
    if epochs is None:
        epochs, why["epochs"] = fit_epochs(len(splits["train"]), config.batch_size)
    if config.budget_s and config.strategy not in ("auto", "multidepth"):  # auto spends its budget itself
        sized = config.replace(image_size=size, hflip=hflip, crop_scale=crop_scale)
        step_s, per_image = time_steps(sized, splits["train"], labels)
        held_out = len(splits["val"]) + 2 * len(splits["test"])  # test: evaluated once, and again after calibration
        epochs, strategy, why["budget"] = fit_budget(
            config.budget_s, step_s, steps_per_epoch(len(splits["train"]), config.batch_size),
            per_image * len(splits["val"]), FIXED_SECONDS + per_image * held_out, MAX_BUDGET_EPOCHS)
    return Recipe(size, hflip, crop_scale, epochs, strategy, why, given)


def apply_recipe(config: TrainConfig, splits: dict[str, list[Sample]], labels: list[str], out: Path, progress: Progress,
                 resume: bool = False) -> tuple[TrainConfig, Recipe]:
    """The config with the recipe's values filled in, and the recipe (reused as saved when resuming)."""
    path = out / RECIPE_FILE
    if resume and path.is_file():
        recipe = Recipe(**json.loads(path.read_text()))
    else:
        recipe = choose(config, splits, labels)
        path.write_text(json.dumps(recipe.to_dict(), indent=2))
    progress.recipe(recipe.to_dict())
    fitted = config.replace(image_size=recipe.image_size, hflip=recipe.hflip, crop_scale=recipe.crop_scale,
                     epochs=recipe.epochs, strategy=recipe.strategy)
    return fitted, recipe


def after_training_s(per_image_s: float, splits: dict[str, list[Sample]], int8: bool = True) -> float:
    """What a job spends after training, for `auto`'s plan: `FIXED_SECONDS`, plus one pass per image
    over val and the sampled train images (calibration) and over test (evaluation), plus the INT8
    step's passes when it runs (`QuantizeConfig.estimate_s`), at `per_image_s` (the feature pass's
    cost: the same network, the same engine). The 60,000-image job: 29,000 images after training
    (about 80 s that a fixed 20 s left out: 1,016 s on a 900 s budget), then 74 s of INT8 (912 s)."""
    from models.artifact.quantize_inputs import QuantizeConfig
    from models.serving.trust import OOD_TRAIN_IMAGES

    n_train, n_val, n_test = (len(splits[name]) for name in ("train", "val", "test"))
    images = n_val + n_test + min(n_train, OOD_TRAIN_IMAGES)
    quantize = QuantizeConfig().estimate_s(per_image_s, n_train, n_val, n_test) if int8 else 0.0
    return FIXED_SECONDS + per_image_s * images + quantize
