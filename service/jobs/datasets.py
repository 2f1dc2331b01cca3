"""A submitted dataset, checked before a job is queued: layout, labels, per-class counts, the split
training will make, and that every image decodes. Every problem is a DatasetError naming it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from models.errors import DatasetError, TuneserveError
from service.config import Settings
from service.limits import inside_root

MAX_BAD_PATHS = 20  # unreadable images named in one refusal


class SubmitError(TuneserveError):
    """A submission refused: `status` (422 unless said) and a message naming the problem."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def check_dataset(directory: Path, settings: Settings, min_per_class: int,
                  config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Layout, classes, per-class counts, split labels, the split training will make (with the
    config's fractions and seed), and every image decodes; → a summary."""
    from models.data.datasets import check_trainable, load_samples, split_origins, split_samples

    samples = load_samples(directory)
    unlabelled = [s for s in samples if not s.label]
    if unlabelled:
        raise DatasetError(f"{len(unlabelled)} images have no label, e.g. {relative(unlabelled[0].path, directory)}")
    counts = check_trainable(samples, min_per_class=min_per_class)
    config = config or {}
    splits = split_samples(samples, config.get("val_fraction", 0.15), config.get("test_fraction", 0.15), config.get("seed", 0))
    check_decodable(samples, directory, settings)
    origins = split_origins(samples, splits)
    return {"images": len(samples), "classes": len(counts), "per_class": counts, "splits": origins["given"],
            "splits_derived": origins["derived"], "split_sizes": {name: len(group) for name, group in splits.items()}}


def check_images(directory: Path, settings: Settings) -> dict[str, Any]:
    """Images a job may use unlabelled (a quantizer calibrates on them): there are some, and each decodes."""
    from models.data.datasets import load_samples

    samples = load_samples(directory, require_labels=False)
    if not samples:
        raise DatasetError("the dataset holds no images")
    check_decodable(samples, directory, settings)
    labels = sorted({s.label for s in samples if s.label})
    return {"images": len(samples), "classes": len(labels), "labelled": sum(1 for s in samples if s.label)}


def check_decodable(samples: list, directory: Path, settings: Settings) -> None:
    """Every image decodes within the pixel and format limits, or one DatasetError naming the first ones."""
    from models.serving.preprocess import decode_image

    bad = []
    for sample in samples:
        try:
            decode_image(sample.path, max_pixels=settings.max_pixels, allowed_formats=settings.allowed_formats)
        except TuneserveError as error:
            bad.append(f"{relative(sample.path, directory)}: {error}")
    if bad:
        shown = "; ".join(bad[:MAX_BAD_PATHS])
        more = f" (and {len(bad) - MAX_BAD_PATHS} more)" if len(bad) > MAX_BAD_PATHS else ""
        raise DatasetError(f"{len(bad)} of {len(samples)} images cannot be used: {shown}{more}")


def relative(path: Path, root: Path) -> str:
    """`path` as shown to the client: relative to the dataset folder, never a server path."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return Path(path).name


def resolve_data_path(value: str, settings: Settings) -> Path:
    """A `data_path` form field → its folder inside the data root (403 outside, 404 missing)."""
    if settings.data_root is None:
        raise SubmitError("data_path is disabled: no data root is configured (TUNESERVE_DATA_ROOT)", 400)
    return inside_root(settings.data_root, value)
