"""The advise job kind: rank stored models as fine-tune sources for a dataset (models/jobs/advise.py,
torch-free, run in the job child). Unknown or embedding-less candidates are refused at submit time."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from models.jobs.advise import AdviseConfig, read_advice
from models.errors import ModelNotFound, TuneserveError
from models.jobs.events import RUNNER_ENTRIES
from service.finetune.job_record import Job as StoredJob
from service.jobs.datasets import SubmitError
from service.jobs.kinds import JobKind, parse_submitted_config, schema_without, without_server_fields
from service.routes.forms import NAME
from service.schemas import Job


FRACTION = {"minimum": 0, "exclusiveMaximum": 0.9}
ADVISE_RULES = {
    "candidates": {"items": {"type": "string", "pattern": f"^{NAME}(:{NAME})?$"}},
    "folds": {"minimum": 2, "maximum": 20},
    "curve": {"minItems": 1, "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
    "val_fraction": FRACTION, "test_fraction": FRACTION,
    "min_images_per_class": {"minimum": 2},
}


class AdviseJob(Job):
    advice: dict[str, Any] | None = None


def pin_candidate(ref: str) -> str:
    """A stored candidate → its exact version tag; refused when missing or exported without an embedding."""
    from models.artifact import store as model_store

    try:
        version = model_store.resolve(ref)
    except ModelNotFound as error:
        raise SubmitError(f"candidates: {ref!r} is not a stored model: {error}", 422) from None
    if not version.manifest().embedding_output:
        raise SubmitError(f"candidates: model {version.tag} was exported without an 'embedding' output, so the advisor "
                          "cannot use it; fine-tune or re-export it with this tuneserve", 409)
    return version.tag


def validate_advise_config(raw: Any) -> dict[str, Any]:
    """The submitted `config` → a normalised advise config (candidates pinned to versions), or SubmitError."""
    from models.artifact import store as model_store

    raw = parse_submitted_config(raw, KIND.example)
    try:
        config = AdviseConfig.from_dict({**raw, "data": "<uploaded>"}).validate(check_paths=False)
    except TypeError as error:
        raise SubmitError(f"config: {error}") from None
    except TuneserveError as error:
        raise SubmitError(str(error), 422) from None
    if config.candidates:
        config.candidates = [pin_candidate(ref) for ref in config.candidates]
    elif not any(model_store.resolve(name).manifest().embedding_output for name in model_store.list_models()):
        raise SubmitError("no stored model has an 'embedding' output to compare; fine-tune one or run "
                          "`tuneserve bootstrap` (the imagenet model has one)", 409)
    return without_server_fields(config.to_dict())


def advise_config_schema() -> dict[str, Any]:
    """The JSON schema of the advise `config` field: AdviseConfig's fields and types, less the server's."""
    from pydantic import TypeAdapter

    schema = schema_without(TypeAdapter(AdviseConfig).json_schema(), "kind")
    properties = schema["properties"]
    for field in properties.values():  # the defaults are AdviseConfig's, applied by the child
        field.pop("default", None)
    for name, rule in ADVISE_RULES.items():  # AdviseConfig.validate's ranges, declared
        properties[name].update(rule)
    schema["additionalProperties"] = False  # AdviseConfig names an unknown field (422)
    return schema


def advice_of(job: StoredJob) -> dict[str, Any]:
    """What GET /advise/{job_id} adds: the full advice once the job succeeded."""
    return {"advice": read_advice(Path(job.job_dir) / "output") if job.state == "succeeded" else None}


KIND = JobKind(
    name="advise", id_prefix="adv", title="advise", config_model=AdviseConfig,
    validate=validate_advise_config, config_schema=advise_config_schema,
    config_help="The advise config (JSON): `candidates` (stored models), folds, …",
    summary="Rank stored models as fine-tune sources for a dataset (a durable job).",
    example='{"candidates": ["imagenet"]}',
    result_model=AdviseJob, result=advice_of, entry=RUNNER_ENTRIES["advise"],
)
