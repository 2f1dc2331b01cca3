"""The fine-tune job kind: a TrainConfig submitted over HTTP, checked and pinned before it is queued."""
from __future__ import annotations

import re
from typing import Any

from models.errors import ModelNotFound, TuneserveError
from models.jobs.train_config import BACKBONE_NAMES, TrainConfig
from service.jobs.datasets import SubmitError
from service.jobs.kinds import JobKind, parse_submitted_config, schema_without, without_server_fields
from models.artifact.store import NAME_PATTERN

WEIGHT_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def validate_config(raw: Any) -> dict[str, Any]:
    """The submitted `config` → a normalised dict of training config fields, or SubmitError(422/404)."""
    raw = parse_submitted_config(raw, KIND.example)
    if not raw.get("name"):
        raise SubmitError("config: `name` (the target model name) is required")
    try:
        config = TrainConfig.from_dict({**raw, "data": "<uploaded>"})
    except TuneserveError as error:
        raise SubmitError(str(error), 422) from None
    is_registry = config.is_registry_source()
    weight_refs = [config.weights, config.source_parts()[1] if is_registry else None]
    for ref in filter(None, weight_refs):
        if not WEIGHT_NAME.match(ref):
            # a local weights file is a CLI feature; over HTTP it would let a client open any server file
            raise SubmitError(
                f"weights: {ref!r} is not a weights name; over HTTP use a torchvision weight name "
                "(IMAGENET1K_V1, DEFAULT), 'none', or a stored model as the source"
            )
    normalised = without_server_fields(config.to_dict())
    if not is_registry:
        normalised["source"] = pin_source(normalised["source"])
    return normalised


def pin_source(source: str) -> str:
    """A stored model as the source → its exact version tag, so a later publish cannot change what
    this job starts from; 422 when it is neither a backbone nor a stored model."""
    from models.artifact import store as model_store

    try:
        return model_store.resolve(source).tag
    except ModelNotFound as error:
        raise SubmitError(f"source: {source!r} is neither a known backbone nor a stored model: {error}", 422) from None
    except TuneserveError as error:
        raise SubmitError(f"source: {error}", 422) from None


def config_schema() -> dict[str, Any]:
    """The JSON schema of the `config` form field: TrainConfig's fields, types and choices, less the
    fields the server sets. Cross-field rules are checked when the model is built (422)."""
    schema = schema_without(TrainConfig.model_json_schema())
    properties = schema["properties"]
    properties["name"].update(pattern=NAME_PATTERN.pattern)
    # what this route takes of the CLI's forms: a backbone with a weights name, or a stored model
    name = NAME_PATTERN.pattern.removeprefix("^").removesuffix("$")
    backbones = "|".join(re.escape(backbone) for backbone in BACKBONE_NAMES)
    properties["source"].update(pattern=f"^(({backbones})(:{WEIGHT_NAME.pattern[1:-1]})?|{name}(:{name})?)$")
    properties["weights"] = {**properties["weights"], "anyOf": [{"type": "string", "pattern": WEIGHT_NAME.pattern}, {"type": "null"}]}
    schema.update(required=["name"], additionalProperties=False)
    return schema


KIND = JobKind(
    name="finetune", id_prefix="ft", title="fine-tune", config_model=TrainConfig,
    validate=validate_config, config_schema=config_schema,
    config_help="The training config (JSON); `name` is the model to publish",
    summary="Start a fine-tune job; every check that can fail runs now and answers a 4xx naming the problem.",
    example='{"name": "digits", "source": "efficientnet_lite0"}',
)
