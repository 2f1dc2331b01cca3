"""Offline demo datasets: scikit-learn's digits and scikit-image's textures (a folder per class), and an
inspection set (thin scratches, cracks and spots on real photos, with masks: training/inspection_data.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

DEMO_SETS = ("digits", "textures", "inspection")
TEXTURES = ("brick", "grass", "gravel", "moon")


def write_digits(directory: Path, size: int = 64) -> int:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (image, target) in enumerate(zip(digits.images, digits.target)):
        folder = directory / str(int(target))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{index:04d}.png")
    return len(digits.images)


def write_textures(directory: Path, size: int = 64, per_class: int = 60, seed: int = 0) -> int:
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    count = 0
    for name in TEXTURES:
        source = getattr(skdata, name)()
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        height, width = source.shape[:2]
        for index in range(per_class):
            side = int(rng.integers(size, min(height, width, size * 3) + 1))
            top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            crop = Image.fromarray(source[top : top + side, left : left + side])
            crop.resize((size, size), Image.Resampling.BILINEAR).save(folder / f"{index:04d}.png")
            count += 1
    return count


def write_demo_data(dataset: str, directory: Path, size: int = 64, per_class: int = 60, seed: int = 0) -> dict[str, Any]:
    """Write `dataset` (one of DEMO_SETS) under `directory`; returns what was written.

    inspection: `per_class` defective images and twice as many clean ones, a quarter of them a given
    test split, `manifest.csv` naming every image (so the `masks/` folder beside them is no class)."""
    if dataset not in DEMO_SETS:
        raise ValueError(f"unknown demo dataset {dataset!r}; known: {', '.join(DEMO_SETS)}")
    directory.mkdir(parents=True, exist_ok=True)
    if dataset == "inspection":  # real sizes (256–320 px a side) are the point of this set: `size` does not apply
        from training.inspection_data import LABELS, write_inspection

        written = write_inspection(directory, per_class, seed)
        return {"dataset": dataset, "directory": str(directory), "images": written["images"], "classes": list(LABELS),
                "defective": written["defective"], "masks": str(directory / "masks.csv")}
    if dataset == "digits":
        count = write_digits(directory, size)
    else:
        count = write_textures(directory, size, per_class, seed)
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
    return {"dataset": dataset, "directory": str(directory), "images": count, "classes": classes}
