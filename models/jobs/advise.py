"""The advise job kind's contract: its config and where its result lives (advice.json). The advisor
and the job child's entry are models/transfer/advise.py, which only a job child loads, so the service
validates advise configs without loading the transfer tools."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from models.errors import TuneserveError

ADVICE_FILE = "advice.json"
CURVE = (0.1, 0.25, 0.5, 1.0)


class AdviseConfigError(TuneserveError, ValueError):
    status = 422


@dataclass
class AdviseConfig:
    """An advise run. `candidates`: stored model refs (name or name:version); empty = every stored model."""

    data: str = ""
    candidates: list[str] = field(default_factory=list)
    name: str = "advise"  # a label for the job listing
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    folds: int = 5
    curve: list[float] = field(default_factory=lambda: list(CURVE))
    min_images_per_class: int = 2
    device: str = "auto"
    output_dir: str = ""  # where advice.json goes; "" = do not write it

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdviseConfig":
        if not isinstance(data, dict):
            raise AdviseConfigError("advise config must be a JSON object")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known) - {"kind"})
        if unknown:
            raise AdviseConfigError(f"unknown advise config fields: {unknown}; known: {known}")
        return cls(**{k: v for k, v in data.items() if k != "kind"})

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "advise", **asdict(self)}

    def validate(self, check_paths: bool = True) -> "AdviseConfig":
        problems = []
        if not self.data:
            problems.append("data: required (folder per class, CSV/JSONL manifest, or zip of either)")
        elif check_paths and not Path(self.data).exists():
            problems.append(f"data: path does not exist: {self.data}")
        if not isinstance(self.candidates, list) or not all(isinstance(c, str) and c for c in self.candidates):
            problems.append(f"candidates: must be a list of stored model names, got {self.candidates!r}")
        if not (isinstance(self.folds, int) and 2 <= self.folds <= 20):
            problems.append(f"folds: must be an integer 2..20, got {self.folds!r}")
        if not (isinstance(self.curve, list) and self.curve and all(isinstance(f, (int, float)) and 0 < f <= 1 for f in self.curve)):
            problems.append(f"curve: must be a non-empty list of fractions in (0, 1], got {self.curve!r}")
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and 0 <= value < 0.9):
                problems.append(f"{key}: must be in [0, 0.9), got {value!r}")
        if not (isinstance(self.min_images_per_class, int) and self.min_images_per_class >= 2):
            problems.append(f"min_images_per_class: must be an integer >= 2, got {self.min_images_per_class!r}")
        if problems:
            raise AdviseConfigError("invalid advise config: " + "; ".join(problems))
        return self


def write_advice(advice: dict[str, Any], directory: str | Path) -> Path:
    path = Path(directory) / ADVICE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(advice, indent=2))
    return path


def read_advice(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / ADVICE_FILE
    return json.loads(path.read_text()) if path.is_file() else None
