"""`TrainConfig`: every knob of a fine-tune run, as one pydantic model that validates itself.

It lives in models/ because it is the contract between the service (which validates a fine-tune
request), the CLI (whose `train` flags are derived from its fields) and training (which runs it);
`training.config` re-exports it. Importable without torch.

Constructing one checks every field and the rules between fields and raises `ConfigError` (422)
naming each problem; `validate()` adds what depends on this machine (the data path exists).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.jobs.backbone_catalog import BACKBONE_NAMES, NO_PRETRAINED, SIZE_MULTIPLES
from models.errors import TuneserveError

__all__ = ["BACKBONE_NAMES", "CLASS_BALANCE", "CONFIG_FILE", "DEVICES", "INSTANT_STRATEGIES", "STRATEGIES",
           "TRAINED_STRATEGIES", "ConfigError", "TrainConfig"]

CONFIG_FILE = "config.json"
TRAINED_STRATEGIES = ("auto", "multidepth", "linear", "partial", "full")  # torch, in a training process
INSTANT_STRATEGIES = ("prototype", "logistic")  # a head on a stored model's embedding, torch-free (models/transfer/instant.py)
STRATEGIES = TRAINED_STRATEGIES + INSTANT_STRATEGIES
CLASS_BALANCE = ("loss", "sampler", "none")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(TuneserveError, ValueError):
    status = 422


def one_of(choices: tuple[str, ...]) -> AfterValidator:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {list(choices)}")
        return value

    return AfterValidator(check)


def choice(choices: tuple[str, ...], default: str, description: str) -> Any:
    return Field(default, description=description, json_schema_extra={"enum": list(choices)})


Strategy = Annotated[str, one_of(STRATEGIES)]
ClassBalance = Annotated[str, one_of(CLASS_BALANCE)]
Device = Annotated[str, one_of(DEVICES)]


class TrainConfig(BaseModel):
    """A fine-tune run: where it starts from, what it learns on, and how it trains."""

    # strict: a string where a number belongs is refused, never coerced ("3" epochs is a 422)
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    name: str = Field(description="The model to publish (a stored model name); each run adds a version")
    source: str = Field(
        "efficientnet_lite0",
        description="A backbone, optionally with weights (`efficientnet_lite0`, `resnet18:IMAGENET1K_V1`, "
                    "`simple_cnn:none`), or a stored model `name[:version]` (lineage is kept)")
    data: str = Field(description="A folder per class, a CSV/JSONL manifest (path,label[,split]), or a zip of either")
    strategy: Strategy = choice(
        STRATEGIES, "auto",
        "auto (default): logistic and multi-depth heads on the frozen source, then a full fine-tune when the budget "
        "and the val scores leave room; the best on val (macro F1) is kept; multidepth: a linear head on pooled "
        "features of every depth of the frozen source; linear: frozen backbone, train the head; partial: the last N blocks + head; full: everything, the backbone "
        "at learning_rate * backbone_lr_scale; prototype | logistic: an instant head on a stored model's embedding")
    epochs: Optional[int] = Field(None, ge=1, le=1000, description="Null: fitted to the data (3-30 epochs, about 200 optimiser steps)")
    epoch_images: Optional[int] = Field(
        None, ge=1, le=100_000_000,
        description="Train images drawn (afresh, at random, without repeats) per epoch; null: all of them. auto sets it "
                    "for a full fine-tune when whole epochs over a large dataset do not fit the budget")
    batch_size: int = Field(32, ge=1, le=4096, description="Images per optimiser step")
    learning_rate: float = Field(3e-3, gt=0, le=10, description="AdamW learning rate of the head")
    image_size: Optional[int] = Field(
        None, ge=8, le=1024,
        description="Input size in pixels; null: fitted to the data (the median shorter side rounded to a multiple "
                    "of 32, at least 96 so tiny images keep a layout in the last feature map, at most the source's size)")
    seed: int = Field(0, description="Seeds the split, the initialisation and the data order")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="Validation share carved from train when the data gives no val split")
    test_fraction: float = Field(0.15, ge=0, lt=1, description="Test share carved from train when the data gives no test split; 0: none")
    output_dir: str = Field("", description="Work dir for checkpoints, metrics and config.json; empty: runs/NAME")
    weights: Optional[str] = Field(
        None,
        description="Null: the source's default (ImageNet where available); 'none': from scratch; a torchvision "
                    "weight name (IMAGENET1K_V1, DEFAULT) or a local state-dict file")
    backbone_lr_scale: float = Field(
        0.333, gt=0, le=10,
        description="partial/full: backbone learning rate = learning_rate * scale (measured on digits: 1e-3 backbone, 3e-3 head)")
    weight_decay: float = Field(1e-4, ge=0, lt=1, description="AdamW weight decay")
    partial_blocks: int = Field(2, ge=1, description="partial: the number of last backbone blocks trained (+ the head)")
    patience: int = Field(0, ge=0, description="Early stopping after N epochs without val-loss improvement; 0: off")
    augment: Optional[bool] = Field(None, description="Random resized crops (+ flips); null: on for partial/full, off for linear (so features cache)")
    hflip: Optional[bool] = Field(None, description="Horizontal flips when augmenting; null: off for grey scans/text, on for photos")
    turns: Optional[bool] = Field(
        None, description="Random quarter turns when augmenting (with hflip: all 8 symmetries of the square), for top-down "
                          "images such as inspection, microscopy or aerial; null: off, and auto turns them on for its full "
                          "fine-tune when it measured that a quarter turn keeps the label")
    crop_scale: Optional[float] = Field(
        None, ge=0.05, le=1, description="Smallest area share of the random training crop; null: 0.85 for scans/text, 0.5 for photos")
    budget_s: Optional[float] = Field(
        None, ge=5, le=7 * 86400,
        description="Wall-clock budget in seconds: the first steps are timed and epochs (and, if one epoch does not fit, "
                    "the strategy) chosen to finish within it")
    crop_fraction: Optional[float] = Field(
        None, ge=0.3, le=1, description="Center crop / resize at evaluation; null: the backbone's, 1.0: no crop")
    class_balance: ClassBalance = choice(CLASS_BALANCE, "loss", "Imbalance handling: a weighted loss, a balanced sampler, or none")
    num_workers: int = Field(0, ge=0, le=64, description="Data loader processes")
    device: Device = choice(DEVICES, "auto", "Where to train (AMP and channels-last on CUDA)")
    # docs/architecture.md (Offline by design): the EfficientNet-Lite package's TF-style 0.01 fails here
    bn_momentum: float = Field(0.1, gt=0, le=1, description="BatchNorm momentum, torch convention")
    min_images_per_class: int = Field(2, ge=1, description="Fewest images a class may have (at least 2 when training, to validate on one)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing")
    top_k: int = Field(5, ge=1, description="Top-k accuracy reported in the evaluation")
    progress_every: int = Field(10, ge=1, description="Optimiser steps between progress events")
    int8: bool = Field(True, description="Also write a static INT8 variant, calibrated on train and checked against fp32 on test")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise ConfigError(describe(error)) from None

    # ---- field rules -------------------------------------------------------------------------
    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        from models.artifact.store import validate_name

        return validate_name(name)

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        from models.artifact.store import validate_name

        base = source.strip().partition(":")[0].strip()
        if not base:
            raise ValueError(f"empty; use a backbone ({', '.join(BACKBONE_NAMES)}) or a stored model name[:version]")
        if base not in BACKBONE_NAMES:
            try:
                validate_name(base)
            except TuneserveError:
                raise ValueError(f"{source!r} is neither a known backbone ({', '.join(BACKBONE_NAMES)}) "
                                 "nor a valid stored model name[:version]") from None
        return source

    @field_validator("data")
    @classmethod
    def _data_given(cls, data: str) -> str:
        if not data:
            raise ValueError("required (folder per class, CSV/JSONL manifest, or zip of either)")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        problems = self._conflicts()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _conflicts(self) -> list[str]:
        """Rules between fields; each message starts with the field to change."""
        base, suffix = self.source_parts()
        problems = []
        if base in BACKBONE_NAMES and suffix and self.weights:
            problems.append(f"source: weights given twice ({suffix!r} in source and weights={self.weights!r})")
        if base in NO_PRETRAINED and (self.weights or suffix or "none").lower() != "none":
            problems.append(f"weights: {base} has no pretrained weights; use weights 'none'")
        if self.is_instant() and self.is_registry_source():
            problems.append(f"source: strategy {self.strategy!r} fits a head on a stored model's embedding; "
                            f"{base!r} is a backbone, not a stored model (use e.g. 'imagenet')")
        multiple = SIZE_MULTIPLES.get(base, 1)
        if self.image_size is not None and self.image_size % multiple:
            problems.append(f"image_size: {base} needs a multiple of its patch size {multiple}, got {self.image_size}")
        if self.val_fraction + self.test_fraction >= 0.9:
            problems.append("val_fraction + test_fraction: must leave at least 10% for training")
        fewest = 1 if self.is_instant() else 2  # a prototype needs one image; training needs one to validate on
        if self.min_images_per_class < fewest:
            problems.append(f"min_images_per_class: must be an integer >= {fewest}, got {self.min_images_per_class}")
        return problems

    # ---- (de)serialisation -------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return list(cls.model_fields)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        if not isinstance(data, dict):
            raise ConfigError("training config must be a JSON object")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"cannot read training config {path}: {error}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with `changes` applied (the dataclasses.replace of this model)."""
        return type(self)(**{**self.to_dict(), **changes})

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

    # ---- checks against this machine ---------------------------------------------------------
    def validate(self, check_paths: bool = True) -> "TrainConfig":
        """Re-check every rule (fields may have been assigned since construction) and, with
        `check_paths`, that the data exists here; raise ConfigError naming the problems."""
        checked = self.replace()
        if check_paths and not Path(checked.data).exists():
            raise ConfigError(f"invalid training config: data: path does not exist: {checked.data}")
        return self


def describe(error: ValidationError) -> str:
    """pydantic's errors → one message naming each field, e.g. `epochs: ... got 0; device: 'tpu' is not one of ...`."""
    unknown = [str(e["loc"][0]) for e in error.errors() if e["type"] == "extra_forbidden"]
    problems = [f"unknown training config fields: {unknown}; known: {TrainConfig.field_names()}"] if unknown else []
    for item in error.errors():
        if item["type"] == "extra_forbidden":
            continue
        field = ".".join(str(part) for part in item["loc"])
        cause = item.get("ctx", {}).get("error")
        if isinstance(cause, ValueError):  # our own validators' messages already read well
            problems.append(f"{field}: {cause}" if field else str(cause))
        elif item["type"] == "missing":
            problems.append(f"{field}: required")
        else:
            problems.append(f"{field}: {item['msg']}, got {item['input']!r}")
    return "invalid training config: " + "; ".join(problems)
