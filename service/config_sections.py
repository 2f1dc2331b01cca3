"""The sections of the service settings (service/config.py): each field documented once, each
value parsed from its `TUNESERVE_<FIELD>` text by the parser in its annotation."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, model_validator

from models.serving.api_keys import KeyFileError, parse_entry
from models.data.datasets import MIB, ZipLimits
from models.serving.preprocess import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS

PREFIX = "TUNESERVE_"
ZIP_LIMITS = ZipLimits()  # archive limits: the defaults live in models/data/datasets.py


class SettingsError(ValueError):
    """A TUNESERVE_* variable has a value the service cannot use."""


def env_name(field_name: str) -> str:
    return PREFIX + field_name.upper()


def service_home(env: Mapping[str, str]) -> Path:
    """$TUNESERVE_HOME, else $BENTOML_HOME/tuneserve (BentoML's default ~/bentoml)."""
    if env.get("TUNESERVE_HOME", "").strip():
        return Path(env["TUNESERVE_HOME"]).expanduser().resolve()
    bentoml_home = Path(env.get("BENTOML_HOME") or Path.home() / "bentoml").expanduser()
    return (bentoml_home / "tuneserve").resolve()


# ---- parsers: (variable name, text) → value, or SettingsError naming the variable -----------
def parsed(parse: Callable[[str, str], Any]) -> BeforeValidator:
    """Parse text (from the environment) with `parse`; a number, flag or path given as a Python
    value is checked the same way, so `Settings.of(workers=-1)` fails as TUNESERVE_WORKERS=-1 does."""
    def before(value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, (int, float, Path)) and not isinstance(value, str):
            value = str(value)
        return parse(env_name(info.field_name), value) if isinstance(value, str) else value

    return BeforeValidator(before)


def number(kind: Callable[[str], Any], minimum: float | None = None, positive: bool = False):
    def parse(name: str, raw: str):
        try:
            value = kind(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r}: expected {'an integer' if kind is int else 'a number'}") from None
        if positive and value <= 0:
            raise SettingsError(f"{name}={raw!r}: must be greater than 0")
        if minimum is not None and value < minimum:
            raise SettingsError(f"{name}={raw!r}: must be at least {minimum}")
        return value

    return parse


def boolean(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name}={raw!r}: expected true/false (1/0, yes/no, on/off)")


def choice(*choices: str):
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise SettingsError(f"{name}={raw!r}: expected one of {', '.join(choices)}")
        return value

    return parse


def share(name: str, raw: str) -> float:
    value = number(float, minimum=0)(name, raw)
    if value > 1:
        raise SettingsError(f"{name}={raw!r}: must be between 0 and 1")
    return value


def model_names(name: str, raw: str) -> tuple[str, ...]:
    from models.artifact.store import split_ref

    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    for item in items:
        try:
            split_ref(item)
        except ValueError as error:
            raise SettingsError(f"{name}: {error}") from None
    return items


def names_or_all(name: str, raw: str) -> tuple[str, ...]:
    return ("*",) if raw.strip() == "*" else model_names(name, raw)


def variable_names(name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated environment variable names, each optionally ending in `*` (a prefix)."""
    names = tuple(part.strip() for part in raw.split(",") if part.strip())
    for part in names:
        if not part.rstrip("*").replace("_", "a").isalnum() or "*" in part[:-1]:
            raise SettingsError(f"{name}={raw!r}: {part!r} is not a variable name (letters, digits, '_', a final '*')")
    return names


def model_ref(name: str, raw: str) -> str:
    refs = model_names(name, raw)
    if len(refs) != 1:
        raise SettingsError(f"{name}={raw!r}: expected one model name")
    return refs[0]


def formats(name: str, raw: str) -> frozenset[str]:
    items = frozenset(item.strip().upper() for item in raw.split(",") if item.strip())
    if not items:
        raise SettingsError(f"{name}={raw!r}: expected a comma-separated list such as JPEG,PNG")
    unknown = items - ALLOWED_FORMATS
    if unknown:
        raise SettingsError(f"{name}: unsupported formats {sorted(unknown)}; choose from {sorted(ALLOWED_FORMATS)}")
    return items


def path(name: str, raw: str) -> Path:
    if not raw.strip():
        raise SettingsError(f"{name} is empty")
    return Path(raw).expanduser().resolve()


def text(name: str, raw: str) -> str | None:
    return raw.strip() or None


def nonempty(name: str, raw: str) -> str:
    if not raw.strip():
        raise SettingsError(f"{name} is empty")
    return raw.strip()


def key_list(name: str, raw: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for number_, entry in enumerate((e for e in raw.split(",") if e.strip()), 1):
        try:
            pairs.append(parse_entry(entry, f"{name} entry {number_}"))
        except KeyFileError as error:
            raise SettingsError(str(error)) from None
    if len({n for n, _ in pairs}) != len(pairs):
        raise SettingsError(f"{name}: a key name appears twice")
    return tuple(pairs)


def Int(minimum: int) -> Any:
    return Annotated[int, parsed(number(int, minimum=minimum))]


def Float(minimum: float | None = None, positive: bool = False) -> Any:
    return Annotated[float, parsed(number(float, minimum=minimum, positive=positive))]


Bool = Annotated[bool, parsed(boolean)]
Share = Annotated[float, parsed(share)]
OptionalText = Annotated[Optional[str], parsed(text)]
SomePath = Annotated[Path, parsed(path)]


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---- the sections -------------------------------------------------------------------------------
class StorageSettings(Section):
    """Where the service keeps its state and where `data_path` parameters may point."""

    home: SomePath = Field(default_factory=lambda: service_home(os.environ), json_schema_extra={"shown_default": "$BENTOML_HOME/tuneserve"},
                           description="Service state: the fine-tune jobs database, job work dirs and logs, the API key file")
    data_root: Optional[SomePath] = Field(None, json_schema_extra={"shown_default": "$TUNESERVE_HOME/data"},
                                          description="`data_path` parameters (jobs, /evaluate) must resolve inside this folder")

    @model_validator(mode="before")
    @classmethod
    def _data_root_under_home(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("data_root") is None and data.get("home") is not None:
            home = data["home"]
            home = path(env_name("home"), home) if isinstance(home, str) else Path(home)
            data = {**data, "home": home, "data_root": home / "data"}
        return data


class ModelSettings(Section):
    """Which models are loaded, and how often the store is checked for new versions."""

    default_model: Annotated[str, parsed(model_ref)] = Field("imagenet", description="The model a request gets when it names none")
    preload: Annotated[tuple[str, ...], parsed(model_names)] = Field((), description="Models loaded at startup besides the default model (comma-separated)")
    poll_seconds: Float(positive=True) = Field(2.0, description="How often each worker checks the store for a new `latest` (jobs poll their children as often)")
    max_loaded_models: Int(1) = Field(8, description="Model versions a worker keeps loaded, all counted (followed `latest`s, pinned and canary versions): the least recently used is unloaded first, never the default model")


class SecuritySettings(Section):
    """API keys and which routes need them (docs/security.md)."""

    auth: Bool = Field(True, description="false (`off`): every route is open, logged as a warning at each start")
    api_key: OptionalText = Field(None, description="One API key, named `default`; clients on this machine send it too")
    api_keys: Annotated[tuple[tuple[str, str], ...], parsed(key_list)] = Field(
        (), json_schema_extra={"shown_default": "(none)"}, description="Named keys: `alice:KEY,bob:KEY` (each key 16+ characters)")
    api_keys_file: Optional[SomePath] = Field(
        None, json_schema_extra={"shown_default": "$TUNESERVE_HOME/api-keys"},
        description="The key file, one `name: key` a line, re-read when it changes; created with one key if no key is set")
    protect_reads: Bool = Field(False, description="When true, reading routes need a key too (health and metrics stay open)")


class LimitSettings(Section):
    """What one request may send (4xx beyond)."""

    max_body_mb: Float(positive=True) = Field(20.0, description="Largest request body, MiB (413 beyond)")
    max_pixels: Int(1) = Field(DEFAULT_MAX_PIXELS, description="Largest decoded image, in pixels (decompression bombs)")
    max_batch: Int(1) = Field(64, description="Images in one /classify_batch request")
    max_top_k: Int(1) = Field(100, description="Largest `top_k` a request may ask for")
    default_top_k: Int(1) = Field(5, description="`top_k` when a request gives none")
    allowed_formats: Annotated[frozenset[str], parsed(formats)] = Field(ALLOWED_FORMATS, description="Image formats accepted (comma-separated)")
    max_zip_entries: Int(1) = Field(ZIP_LIMITS.max_entries, description="Entries an uploaded dataset zip may hold")
    max_unpacked_mb: Float(positive=True) = Field(ZIP_LIMITS.max_unpacked_bytes / MIB, description="Total unpacked size of an uploaded dataset zip, MiB")
    evaluate_max_images: Int(1) = Field(5000, description="Images one /evaluate may hold (413 beyond); one evaluation runs at a time per worker (429)")
    evaluate_max_unpacked_mb: Float(positive=True) = Field(
        512.0, description="Unpacked size of an /evaluate zip, MiB; its scratch is charged to the fine-tune disk budget (507)")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MIB)

    @property
    def max_unpacked_bytes(self) -> int:
        return int(self.max_unpacked_mb * MIB)

    @property
    def evaluate_max_unpacked_bytes(self) -> int:
        return int(self.evaluate_max_unpacked_mb * MIB)


class ServingSettings(Section):
    """How models run and requests are served."""

    device: Annotated[str, parsed(choice("auto", "cpu", "cuda"))] = Field("auto", description="auto | cpu | cuda")
    tensorrt: Bool = Field(False, description="Try ONNX Runtime's TensorRT provider first on a GPU")
    fp16: Bool = Field(False, description="Kept for existing deployments: the same as precision=fp16")
    precision: Annotated[str, parsed(choice("auto", "fp32", "int8", "fp16"))] = Field(
        "auto", description="auto | fp32 | int8 | fp16; auto: int8 on CPU if it passed its gate, fp16 on a GPU (models/artifact/variants.py)")
    threads: Int(0) = Field(0, description="ONNX Runtime intra-op threads per worker; 0: cores / workers")
    workers: Int(0) = Field(0, description="BentoML worker processes; 0: one per GPU, or one per core without a GPU")
    decode_threads: Int(0) = Field(0, description="Image decode threads per worker; 0: cores / workers")
    batch_max_size: Int(1) = Field(32, description="Most images in one micro-batch of /classify requests per model")
    batch_max_latency_ms: Float(minimum=0) = Field(0.0, description="Wait for a batch to fill; 0: batches form while the model is busy (a wait only adds latency)")
    access_log: Bool = Field(True, description="BentoML's per-request access log line")
    max_inflight_requests: Int(1) = Field(
        64, description="Inference requests (/classify, /classify_batch, /v2 and gRPC infer, /evaluate) one worker takes at once; "
        "beyond, 503 with Retry-After (gRPC RESOURCE_EXHAUSTED) at once, before the body is read (docs/security.md)")
    max_queued_images: Int(1) = Field(256, description="Images waiting in one model's micro-batch queue per worker; beyond, 503 at once")
    request_deadline_s: Float(positive=True) = Field(
        5.0, description="Longest an image may wait in the batch queue: one expected to wait longer (queue length × recent "
        "time per image) is refused at once, one that waited longer is answered 503 and never runs")
    retry_after_s: Int(1) = Field(1, description="Seconds a 503 for overload tells the client to wait (Retry-After)")
    grpc_max_concurrent_calls: Int(1) = Field(
        128, description="Concurrent gRPC calls one worker's server accepts; beyond, RESOURCE_EXHAUSTED from gRPC itself")
    grpc_port: Int(0) = Field(8001, description="Port of the Open Inference Protocol over gRPC (Triton's default), "
                              "bound by every worker with SO_REUSEPORT so they share it (docs/protocol.md); 0: no gRPC")


class JobSettings(Section):
    """Fine-tune, advise and quantize jobs: where they run, how many, and their quotas."""

    max_concurrent_jobs: Int(1) = Field(1, description="Jobs running at once")
    job_grace_seconds: Float(minimum=0) = Field(10.0, description="After a cancel, seconds a job child gets to stop before it is killed")
    training_python: Annotated[str, parsed(nonempty)] = Field(
        default_factory=lambda: sys.executable, json_schema_extra={"shown_default": "the serving Python (sys.executable)"},
        description="The Python that runs job children")
    training_command: OptionalText = Field(
        None, json_schema_extra={"shown_default": "<training_python> -m training.run"}, description="The job child's command (a shell-quoted string)")
    finetune_max_upload_mb: Float(positive=True) = Field(
        ZIP_LIMITS.max_archive_bytes / MIB, description="Body limit for job uploads, MiB (instead of max_body_mb)")
    finetune_min_per_class: Int(1) = Field(5, description="Fewest images per class a fine-tune dataset may have")
    job_environment: Annotated[tuple[str, ...], parsed(variable_names)] = Field(
        (), json_schema_extra={"shown_default": "(none)"},
        description="More of the server's environment variables a job child inherits (names, or prefixes ending in `*`), "
                    "beside the allow-list in service/finetune/backends.py; API keys are never passed")
    job_backend: Annotated[str, parsed(choice("local", "ray", "none"))] = Field(
        "local", description="Where jobs run: local child processes, a Ray cluster, or none (job routes answer 501)")
    ray_address: OptionalText = Field(None, description="Ray dashboard URL (http://head:8265); unset: Ray looks up RAY_ADDRESS, then a local cluster")
    ray_num_cpus: Float(minimum=0) = Field(1.0, description="CPUs a Ray job asks for")
    ray_num_gpus: Float(minimum=0) = Field(0.0, description="GPUs a Ray job asks for (at least 1 with device=cuda)")
    max_jobs_per_key: Int(1) = Field(4, description="Queued + running jobs one key may have (429 beyond)")
    max_jobs_total: Int(1) = Field(16, description="Queued + running jobs in all (429 beyond)")
    finetune_disk_budget_mb: Float(positive=True) = Field(20480.0, description="Uploads + job folders, MiB (507 beyond)")
    finetune_retention_hours: Float(positive=True) = Field(168.0, description="Finished jobs' dataset copy and checkpoints are removed after this")
    finetune_min_free_mb: Float(minimum=0) = Field(64.0, description="Kept free on the job disk, MiB: submissions 507, running jobs stopped below it")

    @property
    def finetune_disk_budget_bytes(self) -> int:
        return int(self.finetune_disk_budget_mb * MIB)

    @property
    def finetune_min_free_bytes(self) -> int:
        return int(self.finetune_min_free_mb * MIB)

    @property
    def finetune_max_upload_bytes(self) -> int:
        return int(self.finetune_max_upload_mb * MIB)

    @property
    def retention_seconds(self) -> float:
        return self.finetune_retention_hours * 3600.0


class LoopSettings(Section):
    """The production loop: prediction records, image capture, drift, rollouts (docs/production-loop.md)."""

    loop_max_records: Int(1) = Field(100_000, description="Prediction records kept for feedback by request_id (oldest out first)")
    capture_models: Annotated[tuple[str, ...], parsed(names_or_all)] = Field(
        (), description="Models whose request images are captured (`*`: all); POST /models/{name}/capture switches one")
    capture_fraction: Share = Field(0.05, description="Share of confident in-domain requests captured (abstained / out-of-domain: all)")
    capture_max_mb: Float(positive=True) = Field(1024.0, description="Capture store size limit, MiB (oldest out first)")
    capture_max_items: Int(1) = Field(10_000, description="Capture store image count limit")
    capture_max_age_hours: Float(positive=True) = Field(168.0, description="Captured images older than this are removed")
    capture_min_free_mb: Float(minimum=0) = Field(256.0, description="Capture skips an image rather than leave less free on the disk, MiB")
    drift_fraction: Share = Field(0.25, description="Share of answered images sampled for drift windows")
    drift_window: Int(10) = Field(200, description="Samples per drift window (the newest, per version)")
    drift_max_samples: Int(10) = Field(2000, description="Drift samples kept per version")
    drift_interval_s: Float(positive=True) = Field(30.0, description="How often each version's drift window is computed, seconds")
    drift_alpha: Share = Field(0.01, description="MMD permutation p-value below which a window counts as drifted (windows never overlap: about alpha x windows false alarms a day)")
    loop_refresh_s: Float(positive=True) = Field(1.0, description="How often each worker re-reads rollouts and capture switches, seconds")
    auto_promote: Bool = Field(False, description="Promote a candidate once its live accuracy's 95 % Wilson lower bound is above stable's upper bound (one worker decides)")
    auto_promote_min_feedback: Int(1) = Field(100, description="Labelled requests each version needs before auto-promote decides")
    auto_promote_margin: Share = Field(0.0, description="Auto-promote also when the candidate's Wilson lower bound is at most this far below stable's upper bound")
