"""What an exported model version is: `manifest.json` and `eval.json`, as pydantic models."""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.errors import ManifestError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
EVAL_FILE = "eval.json"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
CHECKPOINT_FILE = "checkpoint.pt"
EMBEDDING_OUTPUT = "embedding"
EVIDENCE_OUTPUT = "evidence"

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos"]


class Preprocessing(BaseModel):
    """How raw images become the graph's uint8 `[N, size, size, 3]` input.

    `mean`/`std` are in 0–255 pixel units and are baked into the graph; they are recorded here
    so a reader knows what the graph does, never re-applied outside it.
    """

    model_config = ConfigDict(extra="forbid")

    size: int = Field(gt=0, le=4096, description="square crop fed to the graph")
    resize: int = Field(gt=0, le=8192, description="shorter side before the center crop")
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @model_validator(mode="after")
    def _crop_fits(self) -> "Preprocessing":
        if self.resize < self.size:
            raise ValueError(f"resize ({self.resize}) must be >= size ({self.size})")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


VariantName = Literal["int8", "fp16"]
_VARIANT_FILE = re.compile(r"^[A-Za-z0-9_.-]+\.onnx$")


class Variant(BaseModel):
    """Another precision of this version's graph (`model.int8.onnx`), and what it costs in accuracy.

    Measured against the fp32 graph on the same test images. `accuracy_delta` is variant minus
    fp32 (None when the images had no labels: then only agreement with fp32 is known).
    """

    model_config = ConfigDict(extra="forbid")

    file: str = Field(description="graph file next to model.onnx")
    calibration: str | None = Field(default=None, description="calibration method chosen on validation")
    calibration_images: int = 0
    evaluated_on: str = "test"
    samples: int = 0
    accuracy: float | None = None
    accuracy_delta: float | None = None
    agreement: float = Field(ge=0, le=1, description="top-1 agreement with fp32")
    max_probability_diff: float = Field(ge=0)

    @field_validator("file")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        if not _VARIANT_FILE.match(value) or value in (".onnx", "..onnx"):
            raise ValueError(f"variant file must be a plain .onnx file name next to model.onnx, got {value!r}")
        return value


class DatasetInfo(BaseModel):
    fingerprint: str
    num_train: int = 0
    num_val: int = 0
    num_test: int = 0
    source: str = ""
    # which splits the data gave (folders or a `split` column) and which training carved out of
    # train; empty in versions made before this was recorded
    splits_given: list[str] = Field(default_factory=list)
    splits_derived: list[str] = Field(default_factory=list)


class Calibration(BaseModel):
    """Temperature baked into the graph: `probabilities = softmax(logits / temperature)`."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(gt=0)
    fitted_on: str = "val"
    samples: int = 0


class OodSection(BaseModel):
    """What the in-domain score needs besides the arrays in `file` (see models/serving/ood.py)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["mahalanobis"] = "mahalanobis"
    file: str = "ood.npz"
    dims: int = Field(gt=0)
    threshold: float = Field(ge=0, le=1, description="in-domain scores below this count as out of domain")
    threshold_distance: float = Field(ge=0)
    normalised: bool = True
    fitted_on: dict[str, int] = Field(default_factory=dict)

    @field_validator("file")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if Path(value).name != value or value in ("", ".", ".."):
            raise ValueError(f"must be a file name inside the version folder, got {value!r}")
        return value


class EvidenceSection(BaseModel):
    """Whether the graph gives exact evidence maps (`evidence [N, C, side, side]`, summing per class to
    logit − bias; training/evidence.py), or why not. Absent on versions exported before it existed."""

    model_config = ConfigDict(extra="forbid")

    available: bool
    output: str | None = Field(default=None, description="graph output name when available")
    side: int | None = Field(default=None, gt=0, description="the maps' height and width")
    max_error: float | None = Field(default=None, ge=0, description="relative |sum - (logit - bias)| at export")
    reason: str | None = Field(default=None, description="why the graph has no evidence output")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: int = SCHEMA_VERSION
    labels: list[str] = Field(min_length=1)
    preprocessing: Preprocessing
    input_name: str = "image"
    output_names: tuple[str, str] = ("logits", "probabilities")
    embedding_output: str | None = Field(
        default=None, description="graph output with the features the head reads [N, D]; None: exported before it existed")
    backbone: str
    source: str = Field(description="what this model was fine-tuned from: weights id or name:version")
    lineage: list[str] = Field(default_factory=list, description="ancestors, oldest first")
    training: dict[str, Any] = Field(default_factory=dict)
    dataset: DatasetInfo | None = None
    opset: int | None = None
    parity_max_abs_diff: float | None = None
    variants: dict[VariantName, Variant] = Field(
        default_factory=dict, description="other precisions of the graph; empty: fp32 only")
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    # Optional sections; None means "absent" (a version exported without them is served as before).
    calibration: Calibration | None = None
    thresholds: dict[str, float] | None = Field(
        default=None, description="per-label best-F1 probability cut-offs on val, used by min_confidence=auto")
    ood: OodSection | None = None
    recipe: dict[str, Any] | None = Field(
        default=None, description="what was chosen automatically for fields left unset, and why (models/transfer/recipe.py)")
    evidence: EvidenceSection | None = None

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value > SCHEMA_VERSION:
            raise ValueError(f"schema_version {value} is newer than this tuneserve ({SCHEMA_VERSION})")
        return value

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels: list[str]) -> list[str]:
        seen = set()
        dupes = sorted({label for label in labels if label in seen or seen.add(label)})
        if dupes:
            raise ValueError(f"duplicate labels: {dupes}")
        return labels

    @model_validator(mode="after")
    def _thresholds_name_labels(self) -> "Manifest":
        if self.thresholds is not None:
            unknown = sorted(set(self.thresholds) - set(self.labels))
            if unknown:
                raise ValueError(f"thresholds for unknown labels: {unknown[:10]}")
            if any(not 0.0 <= t <= 1.0 for t in self.thresholds.values()):
                raise ValueError("thresholds must be probabilities in [0, 1]")
        return self

    @property
    def temperature(self) -> float:
        return self.calibration.temperature if self.calibration else 1.0

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def summary(self) -> dict[str, Any]:
        return {
            "labels": len(self.labels),
            "backbone": self.backbone,
            "source": self.source,
            "image_size": self.preprocessing.size,
            "variants": ["fp32", *sorted(self.variants)],
            "created_at": self.created_at.isoformat(),
        }


def _explain(error: ValidationError, where: str) -> str:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in error.errors()
    )
    return f"invalid manifest {where}: {problems}"


def parse_manifest(data: dict[str, Any] | str, where: str = "") -> Manifest:
    try:
        if isinstance(data, str):
            return Manifest.model_validate_json(data)
        return Manifest.model_validate(data)
    except ValidationError as error:
        raise ManifestError(_explain(error, where)) from None


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_FILE} in {directory}")
    return parse_manifest(path.read_text(), where=str(path))


def write_manifest(manifest: Manifest, directory: str | Path) -> Path:
    path = Path(directory) / MANIFEST_FILE
    path.write_text(manifest.model_dump_json(indent=2))
    return path


def read_eval(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / EVAL_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_eval(report: dict[str, Any], directory: str | Path) -> Path:
    path = Path(directory) / EVAL_FILE
    path.write_text(json.dumps(report, indent=2))
    return path


def eval_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if not report:
        return None
    keys = ("accuracy", "top_k_accuracy", "samples")
    summary = {k: report[k] for k in keys if k in report}
    if "macro_avg" in report:
        summary["macro_f1"] = report["macro_avg"].get("f1")
    if "calibration" in report:
        summary["ece"] = report["calibration"]["after"]["ece"]
    if report.get("auto"):
        summary["auto_coverage"] = report["auto"]["coverage"]
    return summary
