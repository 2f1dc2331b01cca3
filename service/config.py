"""All service settings in one place, read from `TUNESERVE_*` environment variables.

`load_settings()` reads the environment once; an invalid value raises `SettingsError` naming the
variable, the value and what is expected. README.md (Serving → Configuration) lists every variable.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from models.api_keys import KEYS_FILE_NAME, KeyFileError, parse_entry, service_home
from models.datasets import MIB, ZipLimits
from models.preprocess import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS

PREFIX = "TUNESERVE_"
ZIP_LIMITS = ZipLimits()  # archive limits: the defaults live in models/datasets.py


class SettingsError(ValueError):
    """A TUNESERVE_* variable has a value the service cannot use."""


@dataclass(frozen=True)
class Settings:
    # where things live
    home: Path  # service state: the fine-tune jobs database, job work dirs and logs
    data_root: Path  # `data_path` parameters must resolve inside this folder
    # models
    default_model: str = "imagenet"
    preload: tuple[str, ...] = ()  # loaded at startup besides the default model
    poll_seconds: float = 2.0  # how often each worker checks the store for a new `latest`
    max_loaded_models: int = 8  # distinct model versions kept loaded per worker
    # access (service/auth.py; README "Security")
    auth: bool = True  # false (TUNESERVE_AUTH=off): every route is open, logged as a warning at each start
    api_key: str | None = None  # one key, named "default"
    api_keys: tuple[tuple[str, str], ...] = ()  # named keys: TUNESERVE_API_KEYS="alice:KEY,bob:KEY"
    api_keys_file: Path | None = None  # default $TUNESERVE_HOME/api-keys; created with one key if no key is set
    protect_reads: bool = False  # when true, reading routes need the key too (health/metrics stay open)
    # limits
    max_body_mb: float = 20.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch: int = 64  # images in one /classify_batch request
    max_top_k: int = 100
    default_top_k: int = 5
    allowed_formats: frozenset[str] = ALLOWED_FORMATS
    max_zip_entries: int = ZIP_LIMITS.max_entries
    max_unpacked_mb: float = ZIP_LIMITS.max_unpacked_bytes / MIB
    # runtime
    device: str = "auto"  # auto | cpu | cuda
    tensorrt: bool = False
    fp16: bool = False  # kept for existing deployments: the same as precision=fp16
    precision: str = "auto"  # auto | fp32 | int8 | fp16 (models/variants.py: auto = int8 on CPU if it passed its gate, fp16 on GPU)
    threads: int = 0  # ONNX Runtime intra-op threads per worker; 0 = cores / workers
    workers: int = 0  # BentoML worker processes; 0 = one per GPU, or one per core without a GPU
    decode_threads: int = 0  # image decode threads per worker; 0 = cores / workers
    # micro-batching of /classify requests per model (inside each worker)
    batch_max_size: int = 32
    batch_max_latency_ms: float = 0.0  # batches form while the model is busy; a wait only adds latency
    access_log: bool = True  # BentoML's per-request access log line
    # fine-tune jobs (service/finetune)
    max_concurrent_jobs: int = 1
    job_grace_seconds: float = 10.0
    training_python: str = field(default_factory=lambda: sys.executable)
    training_command: str | None = None  # shlex string; default `<training_python> -m training.run`
    finetune_max_upload_mb: float = ZIP_LIMITS.max_archive_bytes / MIB  # body limit for /finetune uploads instead of max_body_mb
    finetune_min_per_class: int = 5
    # where jobs train (service/finetune/backends.py): local child process, Ray cluster, or off (501)
    job_backend: str = "local"
    ray_address: str | None = None  # Ray dashboard URL (http://head:8265); default: Ray looks up RAY_ADDRESS, then a local cluster
    ray_num_cpus: float = 1.0
    ray_num_gpus: float = 0.0
    # quotas (service/finetune/quotas.py)
    max_jobs_per_key: int = 4  # queued + running jobs one key may have (429 beyond)
    max_jobs_total: int = 16  # queued + running jobs in all (429 beyond)
    finetune_disk_budget_mb: float = 20480.0  # uploads + job folders (507 beyond)
    finetune_retention_hours: float = 168.0  # finished jobs' dataset copy and checkpoints are removed after this
    finetune_min_free_mb: float = 64.0  # kept free on the job disk: submissions 507, running jobs stopped below it
    # the production loop (service/loop; docs/production-loop.md)
    loop_max_records: int = 100_000  # prediction records kept for feedback by request_id (oldest out first)
    capture_models: tuple[str, ...] = ()  # models whose request images are captured ("*": all); POST /models/{name}/capture switches one
    capture_fraction: float = 0.05  # share of confident in-domain requests captured (abstained / out-of-domain: all)
    capture_max_mb: float = 1024.0  # capture store size limit (oldest out first)
    capture_max_items: int = 10_000  # capture store image count limit
    capture_max_age_hours: float = 168.0  # captured images older than this are removed
    capture_min_free_mb: float = 256.0  # capture skips an image rather than leave less free on the disk
    drift_fraction: float = 0.25  # share of answered images sampled for drift windows
    drift_window: int = 200  # samples per drift window (the newest, per version)
    drift_max_samples: int = 2000  # drift samples kept per version
    drift_interval_s: float = 30.0  # how often each version's drift window is computed
    drift_alpha: float = 0.01  # MMD permutation p-value below which a window counts as drifted
    loop_refresh_s: float = 1.0  # how often each worker re-reads rollouts and capture switches
    auto_promote: bool = False  # promote a candidate whose live accuracy is no worse than stable's
    auto_promote_min_feedback: int = 100  # labelled requests each version needs before auto-promote decides
    auto_promote_margin: float = 0.0  # how much lower than stable's the candidate's live accuracy may be

    @property
    def keys_file(self) -> Path:
        return self.api_keys_file or self.home / KEYS_FILE_NAME

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
    def worker_count(self) -> int:
        """Workers to start: as configured, else one per GPU, else one per core.

        On CPU one worker per core with one ONNX Runtime thread each measured 1.2x the HTTP
        throughput of one worker with two threads on 2 cores (bench/serve.py, README).
        """
        if self.workers:
            return self.workers
        from models.runtime import cuda_device_count, default_threads

        return cuda_device_count() or default_threads(1)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MIB)

    @property
    def max_unpacked_bytes(self) -> int:
        return int(self.max_unpacked_mb * MIB)

    @property
    def models_to_load(self) -> list[str]:
        names = [self.default_model, *self.preload]
        return list(dict.fromkeys(n for n in names if n))

    def public(self) -> dict[str, Any]:
        """Settings as JSON-able values, with the API key hidden."""
        data = asdict(self)
        data["api_key"] = "set" if self.api_key else None
        data["api_keys"] = [name for name, _ in self.api_keys]
        data["allowed_formats"] = sorted(self.allowed_formats)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


def _number(kind: Callable[[str], Any], minimum: float | None = None, positive: bool = False):
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


def _bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name}={raw!r}: expected true/false (1/0, yes/no, on/off)")


def _choice(*choices: str):
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise SettingsError(f"{name}={raw!r}: expected one of {', '.join(choices)}")
        return value

    return parse


def _names(name: str, raw: str) -> tuple[str, ...]:
    from models.store import split_ref

    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    for item in items:
        try:
            split_ref(item)
        except ValueError as error:
            raise SettingsError(f"{name}: {error}") from None
    return items


def _names_or_all(name: str, raw: str) -> tuple[str, ...]:
    return ("*",) if raw.strip() == "*" else _names(name, raw)


def _model_ref(name: str, raw: str) -> str:
    refs = _names(name, raw)
    if len(refs) != 1:
        raise SettingsError(f"{name}={raw!r}: expected one model name")
    return refs[0]


def _formats(name: str, raw: str) -> frozenset[str]:
    items = frozenset(item.strip().upper() for item in raw.split(",") if item.strip())
    if not items:
        raise SettingsError(f"{name}={raw!r}: expected a comma-separated list such as JPEG,PNG")
    unknown = items - ALLOWED_FORMATS
    if unknown:
        raise SettingsError(f"{name}: unsupported formats {sorted(unknown)}; choose from {sorted(ALLOWED_FORMATS)}")
    return items


def _path(name: str, raw: str) -> Path:
    if not raw.strip():
        raise SettingsError(f"{name} is empty")
    return Path(raw).expanduser().resolve()


def _text(name: str, raw: str) -> str | None:
    return raw.strip() or None


def _key_list(name: str, raw: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for number, entry in enumerate((e for e in raw.split(",") if e.strip()), 1):
        try:
            pairs.append(parse_entry(entry, f"{name} entry {number}"))
        except KeyFileError as error:
            raise SettingsError(str(error)) from None
    if len({n for n, _ in pairs}) != len(pairs):
        raise SettingsError(f"{name}: a key name appears twice")
    return tuple(pairs)


def _share(name: str, raw: str) -> float:
    value = _number(float, minimum=0)(name, raw)
    if value > 1:
        raise SettingsError(f"{name}={raw!r}: must be between 0 and 1")
    return value


def _python(name: str, raw: str) -> str:
    if not raw.strip():
        raise SettingsError(f"{name} is empty")
    return raw.strip()


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "home": _path,
    "data_root": _path,
    "default_model": _model_ref,
    "preload": _names,
    "poll_seconds": _number(float, positive=True),
    "max_loaded_models": _number(int, minimum=1),
    "auth": _bool,
    "api_key": _text,
    "api_keys": _key_list,
    "api_keys_file": _path,
    "protect_reads": _bool,
    "max_body_mb": _number(float, positive=True),
    "max_pixels": _number(int, minimum=1),
    "max_batch": _number(int, minimum=1),
    "max_top_k": _number(int, minimum=1),
    "default_top_k": _number(int, minimum=1),
    "allowed_formats": _formats,
    "max_zip_entries": _number(int, minimum=1),
    "max_unpacked_mb": _number(float, positive=True),
    "device": _choice("auto", "cpu", "cuda"),
    "tensorrt": _bool,
    "fp16": _bool,
    "precision": _choice("auto", "fp32", "int8", "fp16"),
    "threads": _number(int, minimum=0),
    "workers": _number(int, minimum=0),
    "decode_threads": _number(int, minimum=0),
    "batch_max_size": _number(int, minimum=1),
    "batch_max_latency_ms": _number(float, minimum=0),
    "access_log": _bool,
    "max_concurrent_jobs": _number(int, minimum=1),
    "job_grace_seconds": _number(float, minimum=0),
    "training_python": _python,
    "training_command": _text,
    "finetune_max_upload_mb": _number(float, positive=True),
    "finetune_min_per_class": _number(int, minimum=1),
    "job_backend": _choice("local", "ray", "none"),
    "ray_address": _text,
    "ray_num_cpus": _number(float, minimum=0),
    "ray_num_gpus": _number(float, minimum=0),
    "max_jobs_per_key": _number(int, minimum=1),
    "max_jobs_total": _number(int, minimum=1),
    "finetune_disk_budget_mb": _number(float, positive=True),
    "finetune_retention_hours": _number(float, positive=True),
    "finetune_min_free_mb": _number(float, minimum=0),
    "loop_max_records": _number(int, minimum=1),
    "capture_models": _names_or_all,
    "capture_fraction": _share,
    "capture_max_mb": _number(float, positive=True),
    "capture_max_items": _number(int, minimum=1),
    "capture_max_age_hours": _number(float, positive=True),
    "capture_min_free_mb": _number(float, minimum=0),
    "drift_fraction": _share,
    "drift_window": _number(int, minimum=10),
    "drift_max_samples": _number(int, minimum=10),
    "drift_interval_s": _number(float, positive=True),
    "drift_alpha": _share,
    "loop_refresh_s": _number(float, positive=True),
    "auto_promote": _bool,
    "auto_promote_min_feedback": _number(int, minimum=1),
    "auto_promote_margin": _share,
}


def env_name(field_name: str) -> str:
    return PREFIX + field_name.upper()


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from `env` (default: os.environ); raises SettingsError on an invalid value."""
    env = os.environ if env is None else env
    # TUNESERVE_BAKED_MODELS: exported by the service for its job children (models/store.py), not a setting
    known = {env_name(f.name) for f in fields(Settings)} | {"TUNESERVE_BAKED_MODELS"}
    # A typo such as TUNESERVE_MAX_BODYMB would otherwise go unnoticed; a warning, not an error, because
    # other processes read TUNESERVE_* variables of their own (the training child: TUNESERVE_JOB_ID).
    unknown = sorted(k for k in env if k.startswith(PREFIX) and k not in known)
    if unknown:
        logging.getLogger("tuneserve.config").warning("ignoring unknown setting(s) %s", unknown)
    values: dict[str, Any] = {}
    for name, parse in _PARSERS.items():
        raw = env.get(env_name(name))
        if raw is not None:
            values[name] = parse(env_name(name), raw)
    if "home" not in values:
        values["home"] = service_home(env)
    if "data_root" not in values:
        values["data_root"] = values["home"] / "data"
    settings = Settings(**values)
    if settings.default_top_k > settings.max_top_k:
        raise SettingsError(
            f"TUNESERVE_DEFAULT_TOP_K ({settings.default_top_k}) exceeds TUNESERVE_MAX_TOP_K ({settings.max_top_k})"
        )
    return settings


def describe_variables() -> list[tuple[str, str]]:
    """(variable, default) for every setting, for docs and `--help`."""
    defaults = {f.name: f.default for f in fields(Settings)}
    rows = []
    for name in _PARSERS:
        default = defaults.get(name)
        if name == "home":
            default = "$BENTOML_HOME/tuneserve"
        elif name == "data_root":
            default = "$TUNESERVE_HOME/data"
        elif name == "api_keys_file":
            default = "$TUNESERVE_HOME/api-keys"
        elif name == "training_python":
            default = "the serving Python (sys.executable)"
        elif name == "training_command":
            default = "<training_python> -m training.run"
        elif isinstance(default, frozenset):
            default = ",".join(sorted(default))
        rows.append((env_name(name), str(default)))
    return rows
