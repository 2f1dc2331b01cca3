"""Labelled image datasets without torch: folder per class, CSV/JSONL manifests, zips of either.

Shared by training, the evaluate and fine-tune routes, and batch scoring, so every consumer
agrees on layout rules, split assignment and the dataset fingerprint.
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
import stat
import tempfile
import zipfile
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from models.errors import DatasetError, ImageError
from models.serving.preprocess import decode_image

MAX_LISTED = 20  # unreadable images named in one error

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl", "labels.csv", "labels.jsonl")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str | None
    split: str | None = None


MIB = 1024**2


@dataclass(frozen=True)
class ZipLimits:
    """What an uploaded dataset archive may hold. These defaults are the only ones: the service's
    settings (service/config_sections.py) start from them."""

    max_archive_bytes: int = 500 * MIB
    max_entries: int = 50_000
    max_unpacked_bytes: int = 2048 * MIB


def safe_extract_zip(archive: str | Path, destination: str | Path, limits: ZipLimits = ZipLimits()) -> Path:
    """Extract after checking every entry: size, count, unpacked total, zip-slip and links."""
    archive, destination = Path(archive), Path(destination)
    if archive.stat().st_size > limits.max_archive_bytes:
        raise DatasetError(f"archive is {archive.stat().st_size} bytes; limit is {limits.max_archive_bytes}")
    try:
        bundle = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise DatasetError("dataset is not a valid zip archive") from None
    with bundle:
        entries = bundle.infolist()
        if len(entries) > limits.max_entries:
            raise DatasetError(f"archive has {len(entries)} entries; limit is {limits.max_entries}")
        total = sum(e.file_size for e in entries)
        if total > limits.max_unpacked_bytes:
            raise DatasetError(f"archive unpacks to {total} bytes; limit is {limits.max_unpacked_bytes}")
        for entry in entries:
            name = PurePosixPath(entry.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or (name.parts and name.parts[0].endswith(":")):
                raise DatasetError(f"unsafe path in archive: {entry.filename!r}")
            mode = entry.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise DatasetError(f"links are not allowed in archives: {entry.filename!r}")
        destination.mkdir(parents=True, exist_ok=True)
        root = destination.resolve()
        for entry in entries:
            target = (destination / entry.filename).resolve()
            if not target.is_relative_to(root):
                raise DatasetError(f"unsafe path in archive: {entry.filename!r}")
            try:
                bundle.extract(entry, destination)
            except (zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, EOFError) as error:
                # bad CRC, corrupt deflate stream, encrypted entry, unsupported compression
                raise DatasetError(f"cannot extract {entry.filename!r} from the archive: {error}") from None
    return _single_top_folder(destination)


def _single_top_folder(directory: Path) -> Path:
    """Zips made with `zip -r data.zip data/` wrap everything in one folder; look inside it."""
    if _find_manifest(directory):
        return directory
    children = [c for c in directory.iterdir() if not c.name.startswith((".", "__MACOSX"))]
    if len(children) == 1 and children[0].is_dir():
        inner = children[0]
        if _find_manifest(inner) or any(c.is_dir() for c in inner.iterdir()):
            return inner
    return directory


def _find_manifest(directory: Path) -> Path | None:
    for name in MANIFEST_NAMES:
        if (directory / name).is_file():
            return directory / name
    return None


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _read_manifest_rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DatasetError(f"{path.name} line {number}: invalid JSON ({error.msg})") from None
        return rows
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _resolve_inside(root: Path, relative: str, where: str) -> Path:
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise DatasetError(f"{where}: path {relative!r} leaves the dataset folder")
    return candidate


def samples_from_manifest(path: Path, require_labels: bool = True, require_files: bool = True) -> list[Sample]:
    """`require_files=False` keeps rows whose image is missing (batch scoring reports them per row)."""
    samples = []
    for number, row in enumerate(_read_manifest_rows(path), start=1):
        where = f"{path.name} row {number}"
        if not isinstance(row, dict) or not row.get("path"):
            raise DatasetError(f"{where}: missing 'path'")
        label = row.get("label")
        label = str(label).strip() if label not in (None, "") else None
        if require_labels and label is None:
            raise DatasetError(f"{where}: missing 'label'")
        split = (row.get("split") or "").strip().lower() or None
        if split is not None and split not in SPLITS:
            raise DatasetError(f"{where}: split {split!r} is not one of {SPLITS}")
        image = _resolve_inside(path.parent, str(row["path"]), where)
        if require_files and not image.is_file():
            raise DatasetError(f"{where}: no such image {row['path']!r}")
        samples.append(Sample(image, label, split))
    return samples


def samples_from_folders(root: Path) -> list[Sample]:
    """`root/<class>/*.png`, or `root/<split>/<class>/*.png` when train/val/test folders exist."""
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    layouts = [(d, d.name) for d in split_dirs] if split_dirs else [(root, None)]
    samples = []
    for base, split in layouts:
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for image in sorted(class_dir.rglob("*")):
                if image.is_file() and _is_image(image):
                    samples.append(Sample(image, class_dir.name, split))
    return samples


def samples_from_images(root: Path) -> list[Sample]:
    """Every image under `root`, recursively, without labels (for batch scoring)."""
    return [Sample(p, None) for p in sorted(root.rglob("*")) if p.is_file() and _is_image(p)]


def load_samples(path: str | Path, require_labels: bool = True, require_files: bool = True) -> list[Sample]:
    """A folder (per-class or with a manifest) or a manifest file → samples.

    With `require_labels=False`, a folder holding images at its top level is read as a plain,
    unlabelled folder (recursively), and manifests may omit `label`.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset path does not exist: {path}")
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".jsonl"):
            raise DatasetError(f"a dataset file must be a .csv or .jsonl manifest, got {path.name}")
        samples = samples_from_manifest(path, require_labels, require_files)
    elif manifest := _find_manifest(path):
        samples = samples_from_manifest(manifest, require_labels, require_files)
    elif not require_labels and any(c.is_file() and _is_image(c) for c in path.iterdir()):
        samples = samples_from_images(path)
    else:
        samples = samples_from_folders(path)
    if not samples:
        raise DatasetError(
            f"no images found in {path}: expected class folders of images, or manifest.csv/manifest.jsonl with path,label"
        )
    return samples


def check_trainable(samples: list[Sample], min_per_class: int = 2) -> dict[str, int]:
    """Refuse data that cannot train a classifier; return images per class."""
    counts = Counter(s.label for s in samples)
    if len(counts) < 2:
        raise DatasetError(f"need at least 2 classes, found {len(counts)}: {sorted(map(str, counts))}")
    small = {label: n for label, n in counts.items() if n < min_per_class}
    if small:
        raise DatasetError(f"need at least {min_per_class} images per class; too few: {small}")
    by_split: dict[str, set[str]] = defaultdict(set)
    for sample in samples:
        if sample.split:
            by_split[sample.split].add(sample.label)
    if "train" in by_split:
        for split, labels in by_split.items():
            unknown = labels - by_split["train"]
            if unknown:
                raise DatasetError(f"labels in {split} split but not in train: {sorted(unknown)}")
    return dict(sorted(counts.items()))


def given_splits(samples: list[Sample]) -> list[str]:
    """The split names the data itself assigns (folders or a `split` column), in SPLITS order."""
    present = {s.split for s in samples}
    return [name for name in SPLITS if name in present]


def split_origins(samples: list[Sample], splits: dict[str, list[Sample]]) -> dict[str, list[str]]:
    """Which splits the data gave and which `split_samples` carved out of train (for the manifest)."""
    given = given_splits(samples)
    return {"given": given, "derived": [n for n in ("val", "test") if n not in given and splits[n]]}


def split_samples(
    samples: list[Sample], val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> dict[str, list[Sample]]:
    """Keep every given split as it is; carve the missing val (and test) splits out of train.

    Train is the given train split plus every sample without a split (all samples when the data
    gives none). Carving is stratified by label and seeded, keeps at least one train image per
    class, and never touches a given val or test image. Refused with a DatasetError naming the
    class and its counts: a given split without images of some class, or too few train images
    of a class to carve the missing splits from.
    """
    given = given_splits(samples)
    pool = [s for s in samples if s.split in (None, "train")]
    _check_every_class_present(samples, pool, given)
    fractions = {"val": 0.0 if "val" in given else val_fraction, "test": 0.0 if "test" in given else test_fraction}
    carved = _carve(pool, fractions, seed)
    return {
        "train": carved["train"],
        "val": [s for s in samples if s.split == "val"] + carved["val"],
        "test": [s for s in samples if s.split == "test"] + carved["test"],
    }


def _split_counts(samples: list[Sample], label: str | None) -> str:
    counts = Counter(s.split or "unassigned" for s in samples if s.label == label)
    return ", ".join(f"{name} {counts[name]}" for name in (*SPLITS, "unassigned") if name in counts or name in SPLITS)


def _check_every_class_present(samples: list[Sample], pool: list[Sample], given: list[str]) -> None:
    """Every class needs train images, and images in each split the data gives."""
    labels = sorted({s.label for s in samples}, key=str)
    holders = {"train": pool, **{name: [s for s in samples if s.split == name] for name in ("val", "test")}}
    for name in ["train"] + [n for n in given if n != "train"]:
        present = {s.label for s in holders[name]}
        problems = [f"{label!r} ({_split_counts(samples, label)})" for label in labels if label not in present]
        if problems:
            kind = "the given" if name in given else "the"
            raise DatasetError(
                f"{kind} {name} split has no images of class {', '.join(problems)}; every class needs images in "
                f"train and in every split the data gives"
            )


def _carve(pool: list[Sample], fractions: dict[str, float], seed: int) -> dict[str, list[Sample]]:
    rng = random.Random(seed)
    by_label: dict[str | None, list[Sample]] = defaultdict(list)
    for sample in pool:
        by_label[sample.label].append(sample)
    splits: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for label in sorted(by_label, key=str):
        group = by_label[label][:]
        rng.shuffle(group)
        n_val, n_test = _carve_counts(label, len(group), fractions)
        splits["test"].extend(group[:n_test])
        splits["val"].extend(group[n_test : n_test + n_val])
        splits["train"].extend(group[n_test + n_val :])
    return splits


def _carve_counts(label: str | None, n: int, fractions: dict[str, float]) -> tuple[int, int]:
    """(val, test) images to carve from a class's n train images: at least one per carved split,
    at least one left for training."""
    wanted = [name for name in ("val", "test") if fractions[name] > 0]
    if n < 1 + len(wanted):
        hint = " or set test_fraction to 0" if "test" in wanted else ""
        raise DatasetError(
            f"class {label!r} has {n} train image(s): too few to carve {' and '.join(wanted)} out of them "
            f"(needs at least {1 + len(wanted)}: one per carved split plus one to train on); add images of "
            f"{label!r}, give the {'/'.join(wanted)} split(s) in the data{hint}"
        )
    counts = {name: max(1, round(n * fractions[name])) if name in wanted else 0 for name in ("val", "test")}
    while counts["val"] + counts["test"] > n - 1:  # shrink the larger carve, never below one
        larger = max(wanted, key=lambda name: counts[name])
        counts[larger] -= 1
    return counts["val"], counts["test"]


def fingerprint(samples: list[Sample]) -> str:
    """Content hash of (label, split, image bytes): same data → same fingerprint, wherever it lives."""
    digest = hashlib.sha256()
    for sample in sorted(samples, key=lambda s: (str(s.label), str(s.split), s.path.name, str(s.path))):
        digest.update(f"{sample.label}\0{sample.split}\0".encode())
        digest.update(hashlib.sha256(sample.path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def load_dataset(data: str | Path, scratch: str | Path | None = None) -> list[Sample]:
    """A folder, manifest, or zip of either → samples (zips unpack under `scratch`)."""
    path = Path(data)
    if path.is_file() and path.suffix.lower() == ".zip":
        scratch = Path(scratch or tempfile.mkdtemp(prefix="tuneserve-data-"))
        path = safe_extract_zip(path, scratch)
    return load_samples(path)


def check_readable(samples: list[Sample], workers: int = 2) -> None:
    """Decode every image once; fail listing the unreadable ones (never drop them silently)."""

    def probe(sample: Sample):
        try:
            with Image.open(sample.path) as image:
                image.verify()
            decode_image(sample.path, draft_size=64)
            return None
        except (ImageError, OSError, SyntaxError, ValueError) as error:
            return f"{sample.path}: {error}"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems = [p for p in pool.map(probe, samples) if p]
    if problems:
        shown = "; ".join(problems[:MAX_LISTED])
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise DatasetError(f"{len(problems)} unreadable image(s): {shown}{more}")


def prepare_splits(samples: list[Sample], val_fraction: float, test_fraction: float, seed: int,
                   min_per_class: int) -> tuple[dict[str, list[Sample]], list[str]]:
    check_trainable(samples, min_per_class)
    splits = split_samples(samples, val_fraction, test_fraction, seed)
    if not splits["train"]:
        raise DatasetError("no training images after the split")
    if not splits["val"]:
        raise DatasetError("no validation images after the split; add images or raise val_fraction")
    labels = sorted({s.label for s in samples})
    return splits, labels
