"""`TrainConfig`: every knob of a fine-tune run, as one JSON-serialisable dataclass.

It lives in models/ because it is the contract between the service (which validates a fine-tune
request) and training (which runs it); `training.config` re-exports it.

Importable without torch, so the service can validate a fine-tune request at submit time
(`TrainConfig.from_dict(body).validate()`) without starting a training process.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from models.errors import TuneserveError

CONFIG_FILE = "config.json"
TRAINED_STRATEGIES = ("linear", "partial", "full")  # torch, in a training process
INSTANT_STRATEGIES = ("prototype", "logistic")  # a head on a stored model's embedding, torch-free (models/instant.py)
STRATEGIES = TRAINED_STRATEGIES + INSTANT_STRATEGIES
CLASS_BALANCE = ("loss", "sampler", "none")
DEVICES = ("auto", "cpu", "cuda")

# Registry names, kept here (not in backbones.py) so validation needs no torch.
# training/backbones.py asserts this list equals its registry (tests/test_backbones.py too).
BACKBONE_NAMES = (
    "efficientnet_lite0",
    "simple_cnn",
    "resnet18",
    "resnet50",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
    "regnet_y_400mf",
    "vit_b_16",
)


class ConfigError(TuneserveError, ValueError):
    status = 422


@dataclass
class TrainConfig:
    """A fine-tune run. `source` is a registry backbone with optional weights
    (`efficientnet_lite0`, `resnet18:IMAGENET1K_V1`, `simple_cnn:none`) or a stored model `name[:version]`.
    """

    name: str = ""
    source: str = "efficientnet_lite0"
    data: str = ""
    strategy: str = "full"  # linear | partial | full (torch) | prototype | logistic (instant heads, seconds)
    epochs: int | None = None  # None: fitted to the data (models/recipe.py): 3–30 epochs, about 200 optimiser steps
    batch_size: int = 32
    learning_rate: float = 3e-3  # the head; the backbone gets learning_rate * backbone_lr_scale
    image_size: int | None = None  # None: fitted to the data (models/recipe.py), at most the source's size
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    output_dir: str = ""  # work dir; "" → runs/<name>
    # weights: None = the source's default (ImageNet where available), 'none' = from scratch,
    # a torchvision weight name (IMAGENET1K_V1, DEFAULT) or a local state-dict file.
    weights: str | None = None
    backbone_lr_scale: float = 0.333  # full/partial; measured on digits in README (1e-3 backbone, 3e-3 head)
    weight_decay: float = 1e-4
    partial_blocks: int = 2  # partial: train the last N blocks (+ head)
    patience: int = 0  # early stopping: epochs without val improvement; 0 = off
    augment: bool | None = None  # None: on for partial/full, off for linear (so features cache)
    hflip: bool | None = None  # horizontal flips in augmentation; None: off for grey scans/text, on for photos
    crop_scale: float | None = None  # smallest area share of the random crop; None: 0.85 for scans/text, 0.5 for photos
    budget_s: float | None = None  # wall-clock budget: the first steps are timed and epochs (and strategy) set to fit
    crop_fraction: float | None = None  # center crop / resize; None = backbone default, 1.0 = no crop
    class_balance: str = "loss"  # loss | sampler | none
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda
    bn_momentum: float = 0.1  # docs/architecture.md (Offline by design): the package's TF-style 0.01 fails here
    min_images_per_class: int = 2
    label_smoothing: float = 0.0
    top_k: int = 5
    progress_every: int = 10  # steps between progress events
    int8: bool = True  # also write model.int8.onnx (static QDQ, calibrated on train, checked on test)

    # ---- (de)serialisation -------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        if not isinstance(data, dict):
            raise ConfigError("training config must be a JSON object")
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"unknown training config fields: {unknown}; known: {cls.field_names()}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"cannot read training config {path}: {error}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: str | Path | None = None) -> Path:
        directory = Path(directory or self.resolved_output_dir())
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    # ---- derived values ----------------------------------------------------------------------
    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / (self.name or "run")

    def source_parts(self) -> tuple[str, str | None]:
        """`resnet18:IMAGENET1K_V1` → ('resnet18', 'IMAGENET1K_V1'); a stored model → ('name', version)."""
        base, _, suffix = self.source.strip().partition(":")
        return base.strip(), (suffix.strip() or None)

    def is_registry_source(self) -> bool:
        return self.source_parts()[0] in BACKBONE_NAMES

    def is_instant(self) -> bool:
        return self.strategy in INSTANT_STRATEGIES

    def use_augment(self) -> bool:
        return self.strategy != "linear" if self.augment is None else bool(self.augment)

    # ---- validation --------------------------------------------------------------------------
    def validate(self, check_paths: bool = True) -> "TrainConfig":
        """Raise ConfigError naming every problem; cheap, no torch, no training."""
        from models.store import validate_name

        problems: list[str] = []

        def need(condition: bool, message: str) -> None:
            if not condition:
                problems.append(message)

        try:
            validate_name(self.name)
        except TuneserveError as error:
            problems.append(f"name: {error}")
        base, suffix = self.source_parts()
        need(bool(base), f"source: empty; use a backbone ({', '.join(BACKBONE_NAMES)}) or a stored model name[:version]")
        if base and not self.is_registry_source():
            try:
                validate_name(base)
            except TuneserveError:
                problems.append(
                    f"source: {self.source!r} is neither a known backbone ({', '.join(BACKBONE_NAMES)}) "
                    "nor a valid stored model name[:version]"
                )
        if base in BACKBONE_NAMES and suffix and self.weights:
            problems.append(f"source: weights given twice ({suffix!r} in source and weights={self.weights!r})")
        if base == "simple_cnn" and (self.weights or suffix or "none").lower() != "none":
            problems.append("weights: simple_cnn has no pretrained weights; use weights 'none'")
        need(bool(self.data), "data: required (folder per class, CSV/JSONL manifest, or zip of either)")
        if check_paths and self.data:
            need(Path(self.data).exists(), f"data: path does not exist: {self.data}")
        need(self.strategy in STRATEGIES, f"strategy: {self.strategy!r} is not one of {list(STRATEGIES)}")
        if self.is_instant() and base and self.is_registry_source():
            problems.append(f"source: strategy {self.strategy!r} fits a head on a stored model's embedding; "
                            f"{base!r} is a backbone, not a stored model (use e.g. 'imagenet')")
        if self.epochs is not None:
            need(_is_int(self.epochs) and 1 <= self.epochs <= 1000, f"epochs: must be null or an integer 1..1000, got {self.epochs!r}")
        need(_is_int(self.batch_size) and 1 <= self.batch_size <= 4096, f"batch_size: must be an integer 1..4096, got {self.batch_size!r}")
        need(_is_num(self.learning_rate) and 0 < self.learning_rate <= 10, f"learning_rate: must be in (0, 10], got {self.learning_rate!r}")
        if self.image_size is not None:
            need(_is_int(self.image_size) and 8 <= self.image_size <= 1024, f"image_size: must be null or an integer 8..1024, got {self.image_size!r}")
            if base == "vit_b_16" and _is_int(self.image_size):
                need(self.image_size % 16 == 0, f"image_size: vit_b_16 needs a multiple of its patch size 16, got {self.image_size}")
        need(_is_int(self.seed), f"seed: must be an integer, got {self.seed!r}")
        need(_is_num(self.val_fraction) and 0 < self.val_fraction < 1, f"val_fraction: must be in (0, 1), got {self.val_fraction!r}")
        need(_is_num(self.test_fraction) and 0 <= self.test_fraction < 1, f"test_fraction: must be in [0, 1), got {self.test_fraction!r}")
        if _is_num(self.val_fraction) and _is_num(self.test_fraction):
            need(self.val_fraction + self.test_fraction < 0.9, "val_fraction + test_fraction: must leave at least 10% for training")
        need(_is_num(self.backbone_lr_scale) and 0 < self.backbone_lr_scale <= 10, f"backbone_lr_scale: must be in (0, 10], got {self.backbone_lr_scale!r}")
        need(_is_num(self.weight_decay) and 0 <= self.weight_decay < 1, f"weight_decay: must be in [0, 1), got {self.weight_decay!r}")
        need(_is_int(self.partial_blocks) and self.partial_blocks >= 1, f"partial_blocks: must be an integer >= 1, got {self.partial_blocks!r}")
        need(_is_int(self.patience) and self.patience >= 0, f"patience: must be an integer >= 0, got {self.patience!r}")
        need(self.augment in (None, True, False), f"augment: must be true, false or null, got {self.augment!r}")
        need(self.hflip in (None, True, False), f"hflip: must be true, false or null, got {self.hflip!r}")
        if self.crop_scale is not None:
            need(_is_num(self.crop_scale) and 0.05 <= self.crop_scale <= 1, f"crop_scale: must be null or in [0.05, 1], got {self.crop_scale!r}")
        if self.budget_s is not None:
            need(_is_num(self.budget_s) and 5 <= self.budget_s <= 7 * 86400, f"budget_s: must be null or seconds in [5, 604800], got {self.budget_s!r}")
        if self.crop_fraction is not None:
            need(_is_num(self.crop_fraction) and 0.3 <= self.crop_fraction <= 1, f"crop_fraction: must be null or in [0.3, 1], got {self.crop_fraction!r}")
        need(self.class_balance in CLASS_BALANCE, f"class_balance: {self.class_balance!r} is not one of {list(CLASS_BALANCE)}")
        need(_is_int(self.num_workers) and 0 <= self.num_workers <= 64, f"num_workers: must be an integer 0..64, got {self.num_workers!r}")
        need(self.device in DEVICES, f"device: {self.device!r} is not one of {list(DEVICES)}")
        need(_is_num(self.bn_momentum) and 0 < self.bn_momentum <= 1, f"bn_momentum: must be in (0, 1], got {self.bn_momentum!r}")
        fewest = 1 if self.is_instant() else 2  # a prototype needs one image; training needs one to validate on
        need(_is_int(self.min_images_per_class) and self.min_images_per_class >= fewest,
             f"min_images_per_class: must be an integer >= {fewest}, got {self.min_images_per_class!r}")
        need(_is_num(self.label_smoothing) and 0 <= self.label_smoothing < 1, f"label_smoothing: must be in [0, 1), got {self.label_smoothing!r}")
        need(_is_int(self.top_k) and self.top_k >= 1, f"top_k: must be an integer >= 1, got {self.top_k!r}")
        need(isinstance(self.int8, bool), f"int8: must be true or false, got {self.int8!r}")
        need(_is_int(self.progress_every) and self.progress_every >= 1, f"progress_every: must be an integer >= 1, got {self.progress_every!r}")
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))
        return self


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
