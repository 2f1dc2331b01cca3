"""Torch datasets over `models.data.datasets.Sample`s.

Evaluation images go through `models.serving.preprocess.prepare` (the one copy serving uses); training
images get a random resized crop (+ optional flip) to the same uint8 HWC size. Normalisation is
in the model (`ImageModel`), never here.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from models.data.datasets import Sample, check_readable, load_dataset, prepare_splits  # noqa: F401 (torch-free, re-exported)
from models.artifact.manifest import Preprocessing
from models.serving.preprocess import RESAMPLING, decode_image, prepare


QUARTER_TURNS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)


def random_resized_crop(image: Image.Image, spec: Preprocessing, rng: random.Random, hflip: bool,
                        scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        turns: bool = False) -> np.ndarray:
    """Random crop of `scale` (default 50–100 %) of the area, resized to spec.size; uint8 HWC like `prepare`.
    `hflip` mirrors half the crops; `turns` turns each by 0–3 quarter turns (with both: the square's 8 symmetries)."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            box = (left, top, left + w, top + h)
            break
    else:  # central crop at the allowed ratio
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
    crop = image.resize((spec.size, spec.size), RESAMPLING[spec.interpolation], box=box, reducing_gap=None)
    if hflip and rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    turn = QUARTER_TURNS[rng.randrange(4)] if turns else None
    if turn is not None:
        crop = crop.transpose(turn)
    return np.asarray(crop, dtype=np.uint8)


class ImageDataset(Dataset):
    """(uint8 HWC tensor, class index). `train=True` augments; else the serving preprocessing."""

    def __init__(self, samples: list[Sample], labels: list[str], spec: Preprocessing, train: bool = False,
                 hflip: bool = True, seed: int = 0, cache: bool = True, crop_scale: float = 0.5, turns: bool = False):
        self.samples = samples
        self.index = {label: i for i, label in enumerate(labels)}
        self.targets = [self.index[s.label] for s in samples]
        self.spec = spec
        self.train = train
        self.hflip = hflip
        self.turns = turns
        self.crop_scale = crop_scale
        self.seed = seed
        self.epoch = 0
        # Eval arrays are deterministic: keep them when they fit in ~1 GB.
        self._cache: dict[int, np.ndarray] | None = {} if cache and not train and len(samples) * spec.size**2 * 3 < 2**30 else None

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int):
        sample = self.samples[i]
        if self.train:
            rng = random.Random(hash((self.seed, self.epoch, i)))
            image = decode_image(sample.path)
            array = random_resized_crop(image, self.spec, rng, self.hflip, scale=(self.crop_scale, 1.0),
                                        turns=self.turns)
        elif self._cache is not None and i in self._cache:
            array = self._cache[i]
        else:
            array = prepare(sample.path, self.spec)
            if self._cache is not None:
                self._cache[i] = array
        return torch.from_numpy(np.array(array, dtype=np.uint8, copy=True)), self.targets[i]


def class_weights(targets: list[int], num_classes: int) -> torch.Tensor:
    """Inverse frequency, normalised so a balanced dataset gets all ones."""
    counts = Counter(targets)
    total = len(targets)
    return torch.tensor([total / (num_classes * counts.get(c, 1)) for c in range(num_classes)], dtype=torch.float32)


def make_loader(dataset: ImageDataset, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                balance: str = "none", num_classes: int = 0, pin_memory: bool = False,
                epoch_images: int | None = None) -> DataLoader:
    """`epoch_images` (shuffled loaders): draw that many images per epoch, a fresh random subset each time."""
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    drawn = min(epoch_images or len(dataset), len(dataset))
    if shuffle and balance == "sampler":
        weights = class_weights(dataset.targets, num_classes)[torch.tensor(dataset.targets)]
        sampler = WeightedRandomSampler(weights.double(), num_samples=drawn, replacement=True, generator=generator)
        shuffle = False
    elif shuffle and drawn < len(dataset):
        sampler = RandomSampler(dataset, num_samples=drawn, generator=generator)
        shuffle = False
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        drop_last=False,
    )
