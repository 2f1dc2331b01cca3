"""Defaults that fit the data: image size, augmentation and (with a time budget) epochs and strategy.

Only fields the user left unset (None) are chosen; every choice is recorded with why, in the job's
progress before training starts and in the manifest's `recipe`. Torch-free: the decisions are
plain functions of measured numbers, so they are unit-tested without training.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from models.data.datasets import Sample

SIZE_MULTIPLE = 32
MIN_SIZE = 96  # tiny images are upsampled so a stride-32 backbone's last map is 3×3, not 1×1 (BiT-HyperRule)
STATS_IMAGES = 200  # image headers read to size the data (a sample: big datasets need not be opened fully)
GRAYSCALE_SHARE = 0.9  # scans and text: nearly every image has equal channels
PHOTO_CROP_SCALE = 0.5  # random resized crop keeps 50–100 % of the area
SCAN_CROP_SCALE = 0.85  # small jitter: 85–100 % of the area, never mirrored
MAX_DETAIL_SCALE = 1.5  # larger images are kept up to this multiple of the source's size (2.25x the cost)
BUDGET_SAFETY = 0.85  # plan to use this share of the budget; the rest absorbs noise
LINEAR_EPOCHS = 10  # cached features make each linear epoch nearly free
MIN_STEPS = 200  # small datasets get more epochs: a head and a backbone need updates, not passes
EPOCH_RANGE = (3, 30)
BUDGET_BASE_S = 60.0  # `auto`'s default budget: a minute, plus this much per train image, within the range
BUDGET_PER_IMAGE_S = 0.03
BUDGET_RANGE_S = (60.0, 900.0)


@dataclass
class DataStats:
    images: int
    median_short_side: int
    grayscale_share: float


@dataclass
class Recipe:
    """What a run uses for the fields left unset, and why; `given` lists the fields the user set."""

    image_size: int
    hflip: bool
    crop_scale: float
    epochs: int
    strategy: str
    why: dict[str, str] = field(default_factory=dict)
    given: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def data_stats(samples: list[Sample], limit: int = STATS_IMAGES) -> DataStats:
    """Shorter sides and colourfulness of (an even sample of) the images, from headers and thumbnails."""
    from PIL import Image, ImageStat

    step = max(1, len(samples) // limit)
    sides, grey = [], 0
    chosen = samples[::step][:limit]
    for sample in chosen:
        with Image.open(sample.path) as image:
            sides.append(min(image.size))
            if image.mode in ("L", "LA", "1", "I", "I;16", "F"):
                grey += 1
                continue
            image.draft("RGB", (64, 64))
            small = image.convert("RGB").resize((32, 32))
        spread = ImageStat.Stat(small.convert("HSV")).mean[1]  # mean saturation, 0–255
        grey += spread < 8
    return DataStats(len(chosen), int(statistics.median(sides)), grey / max(1, len(chosen)))


def fit_image_size(stats: DataStats, default: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, str]:
    rounded = int(round(stats.median_short_side / multiple)) * multiple
    if rounded > default:
        return fine_detail_size(stats, default, rounded)
    size = max(min(MIN_SIZE, default), min(default, rounded))
    return size, (f"median shorter side {stats.median_short_side}px over {stats.images} images, rounded to a multiple "
                  f"of {multiple} and kept within [{MIN_SIZE}, {default}] (the source's size): smaller images are "
                  "upsampled so the last feature map keeps a layout")


def fine_detail_size(stats: DataStats, default: int, rounded: int) -> tuple[int, str]:
    """Images larger than the source's size are kept nearer their own size, up to MAX_DETAIL_SCALE times it.

    Where the evidence is small (a 1–2 px crack or scratch on a 300 px inspection image) a downscale to
    the source's size blurs it below a pixel; where it is not (a photo's object), a moderately larger
    input does not hurt a CNN's frozen features (FixRes, Touvron et al. 2019: objects look larger at
    test time than in random-resized-crop training). Nothing cheap tells the two apart before a forward
    pass, so the cost (at most 2.25x per image) is paid, and the budget sees it in the timed pass."""
    cap = max(default, int(default * MAX_DETAIL_SCALE // SIZE_MULTIPLE) * SIZE_MULTIPLE)
    size = min(rounded, cap)
    return size, (f"median shorter side {stats.median_short_side}px over {stats.images} images, larger than the "
                  f"source's {default}px: small evidence (a thin crack, a scratch) would be blurred below a pixel "
                  f"by a downscale to {default}px, so {size}px (the median rounded to {SIZE_MULTIPLE}, at most "
                  f"{MAX_DETAIL_SCALE:g}x the source's size; {(size / default) ** 2:.1f}x its cost per image)")


def default_budget_s(train_images: int) -> float:
    """`auto`'s wall-clock budget when none is given: a minute plus a little per train image."""
    low, high = BUDGET_RANGE_S
    return min(high, max(low, BUDGET_BASE_S + BUDGET_PER_IMAGE_S * train_images))


def fit_augmentation(stats: DataStats) -> tuple[bool, float, str]:
    """(hflip, crop scale, why): scans and text are not mirrored and barely cropped."""
    if stats.grayscale_share >= GRAYSCALE_SHARE:
        return False, SCAN_CROP_SCALE, (
            f"{stats.grayscale_share:.0%} of the images are grey (scans, text, digits): small jitter "
            f"(random crop of {SCAN_CROP_SCALE:.0%}–100 % of the area), no flips (a mirrored digit or letter is another symbol)")
    return True, PHOTO_CROP_SCALE, (
        f"colour images ({1 - stats.grayscale_share:.0%} not grey): random resized crop "
        f"{PHOTO_CROP_SCALE:.0%}–100 % and horizontal flips")


def fit_budget(budget_s: float, step_s: float, steps_per_epoch: int, eval_s: float, fixed_s: float,
               max_epochs: int) -> tuple[int, str, str]:
    """(epochs, strategy, why) that fit `budget_s`, from a measured training step and evaluation pass.

    Full fine-tuning when at least one epoch fits; otherwise linear on cached features (one
    forward pass over the data, then nearly free epochs).
    """
    room = budget_s * BUDGET_SAFETY - fixed_s
    epoch_s = step_s * steps_per_epoch + eval_s
    epochs = int(room // epoch_s) if epoch_s > 0 else max_epochs
    measured = (f"measured {step_s:.2f}s per training step × {steps_per_epoch} steps + {eval_s:.1f}s validation "
                f"= {epoch_s:.1f}s per epoch, {fixed_s:.0f}s for export and evaluation")
    if epochs >= 1:
        chosen = min(epochs, max_epochs)
        return chosen, "full", f"{measured}: {chosen} epoch(s) fit {BUDGET_SAFETY:.0%} of the {budget_s:.0f}s budget"
    return LINEAR_EPOCHS, "linear", (f"{measured}: not one full epoch fits {BUDGET_SAFETY:.0%} of the {budget_s:.0f}s "
                                     "budget, so only the head is trained, on features computed once")


def steps_per_epoch(train_images: int, batch_size: int) -> int:
    return max(1, math.ceil(train_images / batch_size))


def fit_epochs(train_images: int, batch_size: int) -> tuple[int, str]:
    steps = steps_per_epoch(train_images, batch_size)
    epochs = min(EPOCH_RANGE[1], max(EPOCH_RANGE[0], math.ceil(MIN_STEPS / steps)))
    return epochs, (f"{train_images} train images in batches of {batch_size}: {steps} steps per epoch; {epochs} epochs "
                    f"give {epochs * steps} optimiser steps (aiming at {MIN_STEPS}, within {EPOCH_RANGE[0]}–{EPOCH_RANGE[1]} epochs)")
