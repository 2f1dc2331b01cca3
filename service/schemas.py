"""The typed answers of the HTTP API (pydantic); the Python client (tuneserve/client.py) parses
responses with the same models.

One prediction shape wherever a prediction appears (`/classify`, each `/classify_batch` item):
`Prediction`. `abstained` and `in_domain` stay at their defaults until a model carries
thresholds and an in-domain score (manifest `thresholds`, `ood`); `variant` names the ONNX file
that answered (fp32 unless a quantized variant was chosen).

Reports and descriptions carry more fields than are listed (extra="allow"): they grow with the
contract (models/), and the schema says which fields are always there.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    """A model whose answers may carry more fields than the ones declared."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Error(_Open):
    """Every refusal: `{"error": "..."}` naming the problem (409 on jobs adds the job's fields)."""

    error: str = Field(description="What was wrong, in words")


class RankedLabel(BaseModel):
    label: str
    probability: float = Field(ge=0, le=1)


class Evidence(BaseModel):
    """Where in the image one class's logit comes from (docs/explain.md): the graph's exact evidence map
    pooled to a small grid, which sums to `logit - bias`."""

    label: str = Field(description="The class explained: `explain_label`, else the most probable label")
    logit: float = Field(description="The class's logit")
    bias: float = Field(description="The part of the logit no image position contributes: logit - sum(grid) * scale")
    scale: float = Field(ge=0, description="The largest |cell| before normalising: grid × scale are the cells' shares of logit - bias")
    grid: list[list[float]] = Field(description="Rows of cells over the crop the model saw, top first, in [-1, 1]; "
                                    "positive cells are evidence for the class, negative against")
    overlay_png: str | None = Field(None, description="With `explain_overlay`: the crop with the grid drawn on it, base64 PNG")


class Prediction(BaseModel):
    """One image's answer: the top label, the ranked top-k, and which model version gave it."""

    model_config = ConfigDict(protected_namespaces=())

    label: str | None = Field(description="The most probable label; null when the model abstained")
    probability: float = Field(ge=0, le=1, description="The top label's (calibrated) probability")
    predictions: list[RankedLabel] = Field(description="The top-k labels, most probable first")
    abstained: bool = Field(False, description="True when the top probability is below `min_confidence` (or, with "
                            "`auto`, below the label's threshold or the image is out of domain)")
    in_domain: float | None = Field(None, description="How typical the image is of the training data: the share of "
                                    "validation images that look less typical (0..1; below the model's "
                                    "threshold, usually 0.05, it is out of domain); null for versions without it")
    model: str
    version: str
    variant: str = Field("fp32", description="Which ONNX file answered: fp32, fp16 or int8")
    request_id: str | None = Field(None, description="This answer's id: POST /feedback with it and the true label "
                                   "(docs/production-loop.md)")
    evidence: Evidence | None = Field(None, description="With `explain`: where the evidence for a class is (docs/explain.md)")

    @classmethod
    def of(cls, ranked: list[dict[str, Any]], model: str, version: str, **extra: Any) -> "Prediction":
        """From `OnnxClassifier.top_k` rows (most probable first)."""
        return cls(
            label=ranked[0]["label"],
            probability=ranked[0]["probability"],
            predictions=ranked,
            model=model,
            version=version,
            **extra,
        )


Classification = Prediction


class BatchItem(Prediction):
    """One image of a batch that was classified."""

    filename: str | None = None


class BatchItemError(BaseModel):
    """One image of a batch that was refused; the other images are still answered."""

    filename: str | None = None
    error: str
    status: int = Field(description="The status this image alone would have got from /classify")


class BatchResult(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    version: str
    variant: str = Field("fp32", description="Which ONNX file answered: fp32, fp16 or int8")
    results: list[BatchItem | BatchItemError] = Field(description="One per uploaded image, in order")
    succeeded: int = Field(ge=0)
    failed: int = Field(ge=0)


class ClassMetrics(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int


class EvalReport(_Open):
    """The eval.json report (models/data/metrics.py); with `compare_with`, the other model's report too."""

    model: str = Field(description="name:version evaluated")
    samples: int
    accuracy: float
    top_k: int
    top_k_accuracy: float
    per_class: dict[str, ClassMetrics]
    labels_evaluated: list[str] = []
    unreadable: dict[str, str] = Field({}, description="Images that could not be read, with why")
    compare_with: dict[str, Any] | None = None
    compared_on: dict[str, Any] | None = None
    difference: dict[str, float] | None = None


class VersionSummary(_Open):
    """One stored version (models/artifact/store.describe); `error` instead when it cannot be read."""

    version: str
    labels: int | None = None
    store: str | None = Field(None, description="Which store holds it: `writable` ($BENTOML_HOME/models) or `baked` (in the bento, read-only)")
    error: str | None = None


class StoredModel(BaseModel):
    latest: str | None
    versions: list[VersionSummary]


class ModelList(BaseModel):
    default_model: str
    models: dict[str, StoredModel]
    loaded: dict[str, dict[str, Any]] = Field(description="What this worker holds, by name:version")
    runtime: dict[str, Any] = Field(description="This worker's device and load errors")


class LoadedVersion(BaseModel):
    model: str
    version: str
    variant: str
    follows_latest: bool = Field(description="true: loaded as the model's `latest` (hot-reloaded); false: pinned or a canary")


class Readiness(BaseModel):
    ready: bool = Field(description="The default model is loaded (what /readyz answers 200 for)")
    default_model: str
    worker: int | None = Field(description="The BentoML worker that answered (each holds its own models)")
    loaded: list[LoadedVersion] = Field(description="The versions this worker holds, most recently used first")
    max_loaded_models: int = Field(description="The bound on `loaded` (TUNESERVE_MAX_LOADED_MODELS)")
    loads: int = Field(description="Versions this worker has loaded since it started (cold loads, preloads, reloads)")
    evictions: int = Field(description="Versions unloaded to stay within the bound")
    peak_loaded: int = Field(description="The most versions this worker has held at once")
    load_errors: dict[str, str] = Field(description="Startup loads that failed, by model")


class ModelDetail(BaseModel):
    name: str
    latest: str | None
    versions: list[VersionSummary]
    loaded: dict[str, dict[str, Any]]


class Reloaded(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    version: str
    variant: str = Field("fp32", description="Which ONNX file this worker now serves: fp32, fp16 or int8")
    swapped: list[str] = Field(description="name:version of every model this check swapped in")


JobState = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]


class Job(_Open):
    """A fine-tune job (service/finetune/store.py `Job.public()`)."""

    job_id: str
    state: JobState
    name: str | None = None
    source: str | None = None
    config: dict[str, Any]
    phase: str | None = None
    progress: dict[str, Any] = Field(
        {}, description="What the job child reported (docs/jobs.md): epoch, epochs, step, steps, percent, train_loss, "
                        "val_accuracy, val_loss, eta_s, history, recipe; stage, stage_done, stage_total, stage_eta_s "
                        "(the work inside the current phase); budget_s (the job's whole wall-clock plan)")
    created: float
    started: float | None = None
    finished: float | None = None
    model: str | None = Field(None, description="name:version published when the job succeeded")
    eval: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = 0
    cancel_requested: bool = False
    submitted_by: str | None = Field(None, description="The name of the API key that submitted it")


class JobSubmitted(_Open):
    job_id: str
    state: JobState
    dataset: dict[str, Any] = Field(description="Images, classes and per-class counts found in the dataset")
    config: dict[str, Any] = Field(description="The training config as normalised by the server")


class JobList(BaseModel):
    jobs: list[Job]


class JobDeleted(BaseModel):
    job_id: str
    deleted: bool
    state: JobState
