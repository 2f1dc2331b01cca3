"""An inspection-like offline dataset: thin, low-contrast scratches, cracks and spots on real photos.

Every image is a random crop of one of scikit-image's bundled photos or textures (only those that load
without a download), at a real size (each side drawn from 256–320 px). A third of them (the minority,
as in inspection) get a defect drawn at full resolution: a 1–2 px scratch (a nearly straight polyline),
a random-walk crack (sometimes branched) or a few 2–4 px spots, 1–1.5 times the texture's local
spread off the background (25–90 grey levels). Defects are local and thin, and the clean images hold
natural edges and texture (mortar lines, gravel, a camera's tripod), so a classifier on downsampled
pixels sees next to nothing while a model that looks at fine detail can. Each defect's binary mask is kept for evidence-map evaluation.

Leakage: each photo is cut in two halves along its longer side; train crops come from the first half,
test crops from the second, so no test background was seen in training. Everything is drawn from
`numpy.random.default_rng((seed, split, variant))`: the same seed gives the same images, and the test
split does not depend on how many train images were asked for.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GREY_SOURCES = ("camera", "brick", "grass", "gravel", "moon", "coins", "cell")
COLOUR_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
VARIANTS = {"grey": GREY_SOURCES, "colour": COLOUR_SOURCES, "mixed": GREY_SOURCES + COLOUR_SOURCES}
SPLITS = ("train", "test")
LABELS = ("clean", "defective")
SIZE_RANGE = (256, 320)  # each side, inclusive
DEFECTIVE_SHARE = 1 / 3
MIN_ZOOM, MAX_ZOOM = 0.75, 1.3  # crop window side ÷ output side: at most 1.33x upsampling, some downsampling
SUPERSAMPLE = 4  # defects are drawn 4x larger and box-filtered down: anti-aliased 1–2 px lines
MASK_COVERAGE = 0.3  # a pixel is in the defect's mask when the drawing covers at least this much of it
MIN_DEFECT_PIXELS = 30
NOISE_SIGMA = 1.5  # the same sensor noise on every image, so a drawn defect is not the only noise-free detail
KINDS = ("scratch", "crack", "spots")
KIND_WEIGHTS = (0.4, 0.4, 0.2)


@dataclass
class InspectionImage:
    image: np.ndarray  # uint8 [H, W, 3]; grey images have three equal channels
    mask: np.ndarray  # bool [H, W]: True where the defect is (all False for a clean image)
    label: str  # "clean" or "defective"
    split: str  # "train" or "test": which half of the source photo the crop came from
    source: str  # the scikit-image picture's name
    box: tuple[int, int, int, int]  # the crop window in the source photo: top, left, height, width
    defects: tuple[str, ...]  # the kinds drawn, empty for a clean image

    @property
    def grey(self) -> bool:
        return is_grey(self.image)


def is_grey(image: np.ndarray) -> bool:
    return bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]))


def load_picture(name: str) -> np.ndarray:
    """A bundled scikit-image picture as uint8 [H, W, 3] (grey repeated over the channels, alpha dropped)."""
    from skimage import data as skdata

    picture = np.asarray(getattr(skdata, name)())
    if picture.dtype != np.uint8:
        picture = np.clip(np.rint(picture * (255.0 if picture.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
    if picture.ndim == 2:
        picture = np.repeat(picture[..., None], 3, axis=-1)
    return np.ascontiguousarray(picture[..., :3])


def half_of(picture: np.ndarray, split: str) -> tuple[np.ndarray, tuple[int, int]]:
    """The train (first) or test (second) half of `picture`, cut across its longer side, and its (top, left)."""
    height, width = picture.shape[:2]
    first = split == SPLITS[0]
    if height >= width:
        return (picture[: height // 2], (0, 0)) if first else (picture[height // 2 :], (height // 2, 0))
    return (picture[:, : width // 2], (0, 0)) if first else (picture[:, width // 2 :], (0, width // 2))


def random_crop(region: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A crop of `region` resized to a side pair in SIZE_RANGE, randomly flipped / turned a quarter."""
    from PIL import Image

    out_h, out_w = (int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1)) for _ in range(2))
    limit = min(region.shape[0] / out_h, region.shape[1] / out_w, MAX_ZOOM)
    zoom = float(rng.uniform(min(MIN_ZOOM, limit), limit))
    win_h, win_w = min(region.shape[0], round(out_h * zoom)), min(region.shape[1], round(out_w * zoom))
    top, left = int(rng.integers(0, region.shape[0] - win_h + 1)), int(rng.integers(0, region.shape[1] - win_w + 1))
    crop = Image.fromarray(region[top : top + win_h, left : left + win_w]).resize((out_w, out_h),
                                                                                   Image.Resampling.BICUBIC)
    pixels = np.asarray(crop)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    if rng.random() < 0.5:
        pixels = pixels[::-1]
    return np.ascontiguousarray(pixels), (top, left, win_h, win_w)


def coverage(shape: tuple[int, int], strokes: list[tuple[list[tuple[float, float]], float]],
             dots: list[tuple[float, float, float]] = ()) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of polylines (points in (x, y) pixels, width in px) and discs (x, y, r)."""
    from PIL import Image, ImageDraw

    height, width = shape
    big = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    for points, line_width in strokes:
        scaled = [(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in points]
        draw.line(scaled, fill=255, width=max(1, round(line_width * SUPERSAMPLE)), joint="curve")
    for x, y, radius in dots:
        r = radius * SUPERSAMPLE
        draw.ellipse((x * SUPERSAMPLE - r, y * SUPERSAMPLE - r, x * SUPERSAMPLE + r, y * SUPERSAMPLE + r), fill=255)
    return np.asarray(big.resize((width, height), Image.Resampling.BOX), np.float64) / 255.0


def scratch(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A nearly straight scratch: 1–3 segments bending by at most 12°, 25–60 % of the image's diagonal."""
    height, width = shape
    x, y = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
    angle, left = rng.uniform(0, 2 * np.pi), rng.uniform(0.25, 0.6) * float(np.hypot(height, width))
    points = [(x, y)]
    segments = int(rng.integers(1, 4))
    for _ in range(segments):
        step = left / segments
        x, y = x + step * np.cos(angle), y + step * np.sin(angle)
        points.append((x, y))
        angle += np.deg2rad(rng.uniform(-12, 12))
    return coverage(shape, [(points, rng.uniform(1.0, 1.8))])


def walk(start: tuple[float, float], angle: float, steps: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """A random walk of 2 px steps whose heading zig-zags about `angle` (mean-reverting): a crack's path."""
    x, y = start
    points, turn = [(x, y)], 0.0
    for _ in range(steps):
        turn = 0.8 * turn + rng.normal(0.0, 0.3)
        x, y = x + 2.0 * np.cos(angle + turn), y + 2.0 * np.sin(angle + turn)
        points.append((x, y))
    return points


def crack(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random-walk crack, 60–140 px long, 1–2 px wide, with one thinner branch half the time."""
    height, width = shape
    angle = rng.uniform(0, 2 * np.pi)
    main = walk((rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height), angle, int(rng.integers(30, 71)), rng)
    line_width = rng.uniform(1.0, 2.0)
    strokes = [(main, line_width)]
    if rng.random() < 0.5:
        fork = main[int(rng.integers(len(main) // 4, 3 * len(main) // 4))]
        branch_angle = angle + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.2)
        strokes.append((walk(fork, branch_angle, int(rng.integers(10, 26)), rng), max(1.0, line_width - 0.5)))
    return coverage(shape, strokes)


def spots(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2–4 small spots (radius 2–4 px) within 40 px of each other: a local cluster, as pitting is."""
    height, width = shape
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    dots = [(cx + rng.uniform(-40, 40), cy + rng.uniform(-40, 40), rng.uniform(2.0, 4.0))
            for _ in range(int(rng.integers(2, 5)))]
    return coverage(shape, [], dots)


DRAWERS = {"scratch": scratch, "crack": crack, "spots": spots}


def shade(levels: np.ndarray, alpha: np.ndarray, grey: bool, rng: np.random.Generator) -> np.ndarray:
    """`levels` moved where `alpha` covers them, lighter or darker (whichever has room), by 1–1.5 times
    the texture's spread around the defect, 25–90 grey levels: faint on smooth ground, still seen on gravel."""
    inside = alpha > MASK_COVERAGE
    ys, xs = np.nonzero(inside)
    around = levels[max(0, ys.min() - 8) : ys.max() + 9, max(0, xs.min() - 8) : xs.max() + 9].mean(axis=-1)
    delta = float(np.clip(rng.uniform(1.0, 1.5) * around.std(), 25.0, 90.0))
    under = float(levels[inside].mean())
    sign = -1.0 if rng.random() < 0.6 else 1.0  # cracks and scratches are darker more often than not
    if not 10 <= under + sign * delta <= 245:
        sign = -sign  # a bright scratch on white (or a dark one on black) would clip away
    tint = np.ones(3) if grey else rng.uniform(0.7, 1.0, 3)  # colour images: a slightly tinted mark
    return levels + sign * delta * alpha[..., None] * tint


def add_defect(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(defective float image, bool mask, kinds drawn): one defect, a second one time in five."""
    kinds = [str(rng.choice(KINDS, p=KIND_WEIGHTS)) for _ in range(1 + int(rng.random() < 0.2))]
    levels, mask = image.astype(np.float64), np.zeros(image.shape[:2], bool)
    for kind in kinds:
        alpha = DRAWERS[kind](image.shape[:2], rng)
        while (alpha > MASK_COVERAGE).sum() < MIN_DEFECT_PIXELS:  # a walk that left the image: draw again
            alpha = DRAWERS[kind](image.shape[:2], rng)
        levels = np.clip(shade(levels, alpha, is_grey(image), rng), 0, 255)
        mask |= alpha > MASK_COVERAGE
    return levels, mask, tuple(kinds)


def finish(levels: np.ndarray, rng: np.random.Generator, grey: bool) -> np.ndarray:
    """Sensor noise (one channel's, repeated, for grey images) and rounding to uint8."""
    noise = rng.normal(0.0, NOISE_SIGMA, levels.shape[:2] + ((1,) if grey else (3,)))
    return np.clip(np.rint(levels + noise), 0, 255).astype(np.uint8)


def generate(count: int, seed: int = 0, split: str = "train", variant: str = "grey",
             defective_share: float = DEFECTIVE_SHARE) -> list[InspectionImage]:
    """`count` images of `split`; round(count × defective_share) of them defective, in a seeded order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    sources = VARIANTS[variant]
    rng = np.random.default_rng((seed, SPLITS.index(split), list(VARIANTS).index(variant)))
    regions = {name: half_of(load_picture(name), split) for name in sources}
    defective = np.zeros(count, bool)
    defective[: round(count * defective_share)] = True
    images = []
    for is_defective in rng.permutation(defective):
        source = sources[int(rng.integers(len(sources)))]
        region, (top, left) = regions[source]
        crop, (y, x, win_h, win_w) = random_crop(region, rng)
        box = (top + y, left + x, win_h, win_w)  # in the whole photo
        grey = is_grey(crop)
        levels, mask, kinds = add_defect(crop, rng) if is_defective else (crop.astype(np.float64),
                                                                            np.zeros(crop.shape[:2], bool), ())
        images.append(InspectionImage(finish(levels, rng, grey), mask, LABELS[int(is_defective)], split,
                                      source, box, kinds))
    return images


def write_inspection(directory: Path, per_class: int = 60, seed: int = 0, variant: str = "mixed",
                     test_share: float = 0.25) -> dict[str, Any]:
    """Write a dataset: `<label>/<split>-NNNN.png`, masks at `masks/<same path>`, `manifest.csv`, `masks.csv`.

    `per_class` is the defective count; clean images are twice as many. A share `test_share` of them
    is the given test split (crops from the other half of each photo); `manifest.csv` (path, label,
    split) makes the folders a dataset whose `masks/` folder is not a class. `masks.csv` has, per
    image, its mask, split, source picture, crop box and defect kinds.
    """
    total = per_class * 3
    test_count = max(3, round(total * test_share))
    rows = []
    for split, count in (("train", total - test_count), ("test", test_count)):
        for index, item in enumerate(generate(count, seed, split, variant)):
            relative = Path(item.label) / f"{split}-{index:04d}.png"
            save_png(item.image[..., 0] if item.grey else item.image, directory / relative)
            save_png(item.mask.astype(np.uint8) * 255, directory / "masks" / relative)
            rows.append({"path": relative.as_posix(), "label": item.label, "split": split,
                         "mask": (Path("masks") / relative).as_posix(), "source": item.source,
                         "box": " ".join(map(str, item.box)), "defects": " ".join(item.defects),
                         "defect_pixels": int(item.mask.sum())})
    write_csv(directory / "manifest.csv", [{k: r[k] for k in ("path", "label", "split")} for r in rows])
    write_csv(directory / "masks.csv", rows)
    return {"images": len(rows), "defective": sum(r["label"] == "defective" for r in rows)}


def save_png(pixels: np.ndarray, path: Path) -> None:
    """[H, W] as a grey PNG, [H, W, 3] as RGB (grey images are written with one channel)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)  # 2-d: grey ("L"); [H, W, 3]: RGB


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_mask(path: Path) -> np.ndarray:
    """A mask written by `write_inspection` as a bool [H, W] array."""
    from PIL import Image

    return np.asarray(Image.open(path).convert("L")) > 127
