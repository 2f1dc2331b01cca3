"""What a kind of job is: the registry that the generic job router (router.py) and the submission
pipeline (submit.py) read. Each kind declares its config model, how a submitted config is
validated, what its job answer adds once it has a result, and the entry the job child runs.
Kinds share one store, one runner and one state machine (service/finetune/)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from service.finetune.job_record import Job as StoredJob
from service.jobs.datasets import SubmitError
from service.schemas import Job

# Fields the server fills in itself; a client must not point a job at arbitrary paths.
SERVER_FIELDS = ("data", "output_dir")


@dataclass(frozen=True)
class JobKind:
    name: str  # the URL prefix (/finetune) and the store's `kind`
    id_prefix: str  # job ids start with it: ft-20261202-063000-a1b2c3
    title: str  # in messages: "no fine-tune job …"
    config_model: type  # what the child builds from the config file (TrainConfig, AdviseConfig, …)
    validate: Callable[[Any], dict[str, Any]]  # submitted `config` → normalised dict, or SubmitError
    config_schema: Callable[[], dict[str, Any]]  # the `config` form part's JSON schema
    config_help: str
    summary: str  # the submit operation's one-line description
    example: str  # a config shown when the submitted one is not a JSON object
    result_model: type[Job] = Job  # GET /{kind}/{job_id}
    result: Callable[[StoredJob], dict[str, Any]] = field(default=lambda job: {})  # what that answer adds
    entry: str | None = None  # models/jobs/events.py RUNNER_ENTRIES; None: the fine-tune pipeline
    labelled: bool = True  # the dataset must be labelled and trainable (else: images that decode)


def parse_submitted_config(raw: Any, example: str) -> dict[str, Any]:
    """A job's submitted `config` (JSON text or an object) → a dict without server-set fields, or SubmitError."""
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw or "{}")
        except json.JSONDecodeError as error:
            raise SubmitError(f"config: not valid JSON ({error.msg} at position {error.pos})") from None
    if not isinstance(raw, dict):
        raise SubmitError(f"config: must be a JSON object such as {example}")
    given = [key for key in SERVER_FIELDS if key in raw]
    if given:
        raise SubmitError(f"config: {given} are set by the server (send the data as `dataset` or `data_path`)")
    return raw


def without_server_fields(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key not in SERVER_FIELDS}


def schema_without(schema: dict[str, Any], *fields: str) -> dict[str, Any]:
    """A config model's JSON schema as the `config` form part declares it: no title, no server fields."""
    for key in (*SERVER_FIELDS, *fields):
        schema["properties"].pop(key, None)
    schema.pop("title", None)
    return schema
