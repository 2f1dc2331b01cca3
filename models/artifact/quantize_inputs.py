"""What a quantization run is given: its config, and the images that calibrate it, choose its method
and compare it with fp32 (models/artifact/quantize.py quantizes with them). The images go through
the serving preprocessing, and a version's own training split is reused so calibration never sees
a test image."""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from models.artifact.manifest import Manifest
from models.data.datasets import Sample, split_samples
from models.errors import TuneserveError
from models.serving.preprocess import prepare, stack

METHODS = ("minmax", "percentile", "entropy")  # cheapest first: MinMax builds no histograms
UNLABELLED_SPLIT = (0.6, 0.2)  # calibration, validation; the rest is the test part
# Passes over the images a quantization run loads, at an fp32 pass's cost per image: loading, the fp32
# reference, and per method its calibration and scoring (MinMax about 1 pass, entropy about 2). The
# Fashion-MNIST jobs of bench/scale.py measured 7.0, 7.2 and 5.6 with all three methods tried.
PASSES = 7.0


class QuantizeError(TuneserveError):
    status = 422


class Int8Skipped(QuantizeError):
    """The best calibration fails the serving gate on validation: no variant is written."""


@dataclass(frozen=True)
class QuantizeConfig:
    methods: tuple[str, ...] = METHODS
    calibration_images: int = 300
    max_eval_images: int = 2000  # per split; enough to resolve a 0.5-point accuracy drop
    spare_images: int = 500  # training images not calibrated on, added to validation's fidelity measure
    batch_size: int = 16
    percentile: float = 99.999
    seed: int = 0
    workers: int = 2  # image decode threads

    def images(self, train: int, val: int, test: int) -> int:
        """How many images a run on splits of these sizes loads (`data_from_splits`; no test: val again)."""
        calibration = min(train, self.calibration_images)
        return (calibration + min(val, self.max_eval_images) + min(train - calibration, self.spare_images)
                + min(test or val, self.max_eval_images))

    def estimate_s(self, per_image_s: float, train: int, val: int, test: int) -> float:
        """The run's seconds, planned from an fp32 pass's cost per image (`PASSES` over `images`)."""
        return PASSES * per_image_s * self.images(train, val, test)

    def validate(self) -> "QuantizeConfig":
        unknown = sorted(set(self.methods) - set(METHODS))
        if not self.methods or unknown:
            raise QuantizeError(f"calibration methods must be some of {list(METHODS)}, got {list(self.methods)}")
        if self.calibration_images < 1 or self.batch_size < 1 or self.max_eval_images < 1:
            raise QuantizeError("calibration_images, batch_size and max_eval_images must be at least 1")
        return self


@dataclass
class Images:
    """Prepared uint8 images and, when they are labelled, their class indices."""

    arrays: np.ndarray
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(self.arrays)


@dataclass
class QuantizeData:
    calibration: np.ndarray
    validation: Images
    test: Images
    evaluated_on: str = "test"
    spare: np.ndarray | None = None  # training images calibration did not use (agreement needs no labels)

    def fidelity_images(self) -> np.ndarray:
        """Validation, then the spare training images: where closeness to fp32 is measured."""
        if self.spare is None or not len(self.spare):
            return self.validation.arrays
        return np.concatenate([self.validation.arrays, self.spare])


def _subset(samples: list[Sample], limit: int, seed: int) -> list[Sample]:
    """At most `limit` samples, drawn by seed (the same every run), in their original order."""
    if len(samples) <= limit:
        return list(samples)
    keep = sorted(random.Random(seed).sample(range(len(samples)), limit))
    return [samples[i] for i in keep]


def load_images(samples: list[Sample], manifest: Manifest, limit: int, seed: int = 0, workers: int = 2) -> Images:
    """Samples → the graph's uint8 input through the serving preprocessing (+ labels when all known)."""
    chosen = _subset(samples, limit, seed)
    if not chosen:
        raise QuantizeError("no images to quantize with")
    spec = manifest.preprocessing
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        arrays = stack(list(pool.map(lambda s: prepare(s.path, spec), chosen)))
    index = {label: i for i, label in enumerate(manifest.labels)}
    labelled = all(s.label in index for s in chosen)
    return Images(arrays, np.array([index[s.label] for s in chosen]) if labelled else None)


def data_from_splits(splits: dict[str, list[Sample]], manifest: Manifest, config: QuantizeConfig) -> QuantizeData:
    """Calibrate on train, choose the method on val, compare with fp32 on test (val if no test)."""
    if not splits.get("train") or not splits.get("val"):
        raise QuantizeError("quantization needs training images (calibration) and validation images")
    test, evaluated_on = (splits["test"], "test") if splits.get("test") else (splits["val"], "val")

    def load(part: list[Sample], limit: int) -> Images:
        return load_images(part, manifest, limit, config.seed, config.workers)

    calibration = _subset(splits["train"], config.calibration_images, config.seed)
    used = {s.path for s in calibration}
    spare = [s for s in splits["train"] if s.path not in used]
    return QuantizeData(
        calibration=load(calibration, len(calibration)).arrays,
        validation=load(splits["val"], config.max_eval_images),
        test=load(test, config.max_eval_images),
        evaluated_on=evaluated_on,
        spare=load(spare, config.spare_images).arrays if spare else None,
    )


def data_from_samples(samples: list[Sample], manifest: Manifest, config: QuantizeConfig) -> QuantizeData:
    """Images for an existing version: its training split when labels match, else a split by seed.

    Labelled data with the model's labels is split as training split it (the manifest records
    the fractions and seed), so calibration never sees a test image. Other images (unlabelled, or
    labelled with other classes) are shuffled by seed into calibration, validation and test parts,
    which are then compared with fp32 by agreement alone.
    """
    known = set(manifest.labels)
    if samples and all(s.label in known for s in samples):
        training = manifest.training or {}
        splits = split_samples(samples, float(training.get("val_fraction", 0.15)),
                               float(training.get("test_fraction", 0.15)), int(training.get("seed", 0)))
        return data_from_splits(splits, manifest, config)
    shuffled = list(samples)
    random.Random(config.seed).shuffle(shuffled)
    if len(shuffled) < 3:
        raise QuantizeError(f"need at least 3 images to calibrate, validate and test; got {len(shuffled)}")
    first = max(1, int(len(shuffled) * UNLABELLED_SPLIT[0]))
    second = first + max(1, int(len(shuffled) * UNLABELLED_SPLIT[1]))
    unlabelled = [Sample(s.path, None) for s in shuffled]
    splits = {"train": unlabelled[:first], "val": unlabelled[first:second], "test": unlabelled[second:]}
    return data_from_splits(splits, manifest, config)
