"""Unlabelled calibration images for the bootstrapped `imagenet` model, offline.

    .venv/bin/python bench/calibration_photos.py DIR [--count 400]

The `imagenet` model has no training set to calibrate its INT8 variant on, so this draws random
crops (30–100 % of the area, flips) of scikit-image's bundled pictures and writes them as JPEGs.
The four photos that the benchmarks check top-5 on (chelsea/cat, astronaut, coffee, rocket) are
left out, so the check is on images calibration never saw. Then:

    tuneserve quantize imagenet --data DIR
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import numpy as np

CHECK_PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")
SOURCES = ("camera", "clock", "coins", "colorwheel", "grass", "gravel", "brick", "hubble_deep_field",
           "immunohistochemistry", "moon", "retina", "stereo_motorcycle", "page", "text", "cell", "logo")


def source_images():
    from PIL import Image
    from skimage import data as skdata

    for name in SOURCES:
        array = getattr(skdata, name)()
        if isinstance(array, tuple):  # stereo pairs
            array = array[0]
        yield name, Image.fromarray(np.asarray(array)).convert("RGB")


def random_crop(image, rng: random.Random, side: int = 288):
    from PIL import Image

    width, height = image.size
    area = width * height * rng.uniform(0.3, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = min(width, max(16, round(math.sqrt(area * aspect))))
    h = min(height, max(16, round(math.sqrt(area / aspect))))
    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
    crop = image.crop((left, top, left + w, top + h))
    scale = side / min(w, h)
    crop = crop.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def write_photos(directory: Path, count: int = 400, seed: int = 0) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images = list(source_images())
    for i in range(count):
        name, image = images[i % len(images)]
        random_crop(image, rng).save(directory / f"{name}-{i:04d}.jpg", quality=90)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps({"directory": str(args.directory), "images": write_photos(args.directory, args.count, args.seed)}))


if __name__ == "__main__":
    main()
