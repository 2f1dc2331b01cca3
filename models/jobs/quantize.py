"""The quantize job: add a static INT8 variant to a stored version (models/artifact/quantize.py) as a durable
job, calibrated on a submitted dataset. The config model is what the service validates at submit
time and what the job child reads back; `run_quantize_job` is the child's entry (RUNNER_ENTRIES)."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.errors import DatasetError, ImageError, ModelNotFound, ReadOnlyModel, TuneserveError
from models.jobs.events import ExitCode, Progress
from models.artifact.quantize_inputs import METHODS, QuantizeError
from models.artifact.store import NAME_PATTERN

_NAME = NAME_PATTERN.pattern.removeprefix("^").removesuffix("$")
Method = Literal[METHODS]  # type: ignore[valid-type]


class QuantizeJobConfig(BaseModel):
    """A quantize job. `data`/`output_dir` are set by the server (the submitted dataset, the job folder)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["quantize"] = "quantize"
    model: str = Field(pattern=f"^{_NAME}(:{_NAME})?$", max_length=129,
                       description="The stored version to add the INT8 variant to: `name` (its latest) or `name:version`")
    methods: list[Method] = Field(default=list(METHODS), min_length=1,
                                  description="Calibration methods to try; the best on validation is kept")
    calibration_images: int = Field(300, ge=1, le=100_000, description="Training images to calibrate on")
    data: str | None = None
    output_dir: str | None = None

    @classmethod
    def parse(cls, raw: dict) -> "QuantizeJobConfig":
        """`raw` → the config, or a QuantizeError (422) naming every bad field."""
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors())
            raise QuantizeError(f"config: {problems}") from None


def run_quantize_job(config_path: str | Path, progress: Progress, stop: threading.Event | None = None) -> int:
    """The job child's body for `"kind": "quantize"`: the variant written into the version's folder."""
    import json

    from models.artifact import store
    from models.data.datasets import load_samples
    from models.artifact.quantize import quantize_version
    from models.artifact.quantize_inputs import QuantizeConfig, data_from_samples

    try:
        config = QuantizeJobConfig.parse(json.loads(Path(config_path).read_text()))
        progress.phase("loading")
        version = store.resolve(config.model)
        settings = QuantizeConfig(methods=tuple(config.methods), calibration_images=config.calibration_images).validate()
        data = data_from_samples(load_samples(config.data, require_labels=False), version.manifest(), settings)
        if stop is not None and stop.is_set():
            progress.failed("cancelled (SIGTERM) before quantizing", cancelled=True)
            return ExitCode.TERMINATED
        progress.phase("quantizing")
        variant = quantize_version(version.path, data, settings)
    except (QuantizeError, DatasetError, ImageError, ModelNotFound, ReadOnlyModel) as error:
        progress.failed(str(error))
        return ExitCode.BAD_INPUT
    except TuneserveError as error:
        progress.failed(f"{type(error).__name__}: {error}")
        return ExitCode.FAILED
    progress.succeeded(version.tag, variant.model_dump())
    return ExitCode.OK
