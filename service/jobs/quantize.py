"""The quantize job kind: an INT8 variant for a stored, writable version, calibrated on the
submitted images (labelled or not; models/jobs/quantize.py runs it in the job child)."""
from __future__ import annotations

from typing import Any

from models.errors import ModelNotFound, TuneserveError
from models.jobs.events import RUNNER_ENTRIES
from models.jobs.quantize import QuantizeJobConfig
from service.jobs.datasets import SubmitError
from service.jobs.kinds import JobKind, parse_submitted_config, schema_without, without_server_fields


def validate_quantize_config(raw: Any) -> dict[str, Any]:
    """The submitted `config` → a normalised quantize config (the model pinned to its version), or SubmitError."""
    from models.artifact import store as model_store

    raw = parse_submitted_config(raw, KIND.example)
    try:
        config = QuantizeJobConfig.parse({**raw, "kind": "quantize"})
        version = model_store.resolve(config.model)
    except ModelNotFound as error:
        raise SubmitError(f"model: {error}", 404) from None
    except TuneserveError as error:
        raise SubmitError(str(error), 422) from None
    if version.store != model_store.WRITABLE:
        raise SubmitError(f"model: {version.tag} is baked into the bento (read-only); its variants cannot be added here", 409)
    config.model = version.tag  # pinned: a later publish cannot change which version gets the variant
    return without_server_fields(config.model_dump())


def quantize_config_schema() -> dict[str, Any]:
    schema = schema_without(QuantizeJobConfig.model_json_schema(), "kind")
    schema.update(required=["model"], additionalProperties=False)
    return schema


KIND = JobKind(
    name="quantize", id_prefix="qz", title="quantize", config_model=QuantizeJobConfig,
    validate=validate_quantize_config, config_schema=quantize_config_schema,
    config_help="The quantize config (JSON): `model` (a stored version), `methods`, `calibration_images`",
    summary="Add a static INT8 variant (model.int8.onnx) to a stored version, calibrated on the submitted images.",
    example='{"model": "digits"}', entry=RUNNER_ENTRIES["quantize"], labelled=False,
)
