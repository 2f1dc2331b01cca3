"""All service settings: one pydantic-settings model in sections, read from `TUNESERVE_*` variables.

Each field is documented once, here; `docs/configuration.md` is generated from these fields
(`python -m service.config --markdown`). Variables keep flat names (`TUNESERVE_MAX_PIXELS`, not
`TUNESERVE_LIMITS__MAX_PIXELS`): a field's name is unique across sections, so the section is only
where it is documented and read (`settings.limits.max_pixels`; `settings.max_pixels` reads the same).

`load_settings()` reads the environment once; an invalid value raises `SettingsError` naming the
variable, the value and what is expected.
"""
from __future__ import annotations

import logging
import os
import shlex
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from models.serving.api_keys import KeySettings
from models.data.datasets import MIB
from service.config_sections import (
    PREFIX,
    JobSettings,
    LimitSettings,
    LoopSettings,
    ModelSettings,
    SecuritySettings,
    ServingSettings,
    SettingsError,
    StorageSettings,
    env_name,
    service_home,
)

__all__ = ["PREFIX", "Settings", "SettingsError", "env_name", "key_settings", "load_settings", "markdown"]

# Read by other processes, not settings: the job child (TUNESERVE_JOB_ID, TUNESERVE_BAKED_MODELS from
# models/artifact/store.py) and clients (TUNESERVE_SERVER, TUNESERVE_API_KEY is also a setting).
NOT_SETTINGS = {"TUNESERVE_BAKED_MODELS", "TUNESERVE_JOB_ID", "TUNESERVE_SERVER"}
_ENVIRONMENT: ContextVar[Mapping[str, str] | None] = ContextVar("tuneserve_environment", default=None)


class FlatEnvironment(PydanticBaseSettingsSource):
    """`TUNESERVE_<FIELD>` for every field of every section; the service home from BENTOML_HOME
    when TUNESERVE_HOME is not set."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads the sections whole

    def __call__(self) -> dict[str, Any]:
        env = _ENVIRONMENT.get()
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for section, info in self.settings_cls.model_fields.items():
            found = {name: env[env_name(name)] for name in info.annotation.model_fields if env_name(name) in env}
            values[section] = found
        values["storage"].setdefault("home", service_home(env))
        return values


class Settings(BaseSettings):
    """Every setting of the service, by section."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    storage: StorageSettings
    models: ModelSettings
    security: SecuritySettings
    limits: LimitSettings
    serving: ServingSettings
    jobs: JobSettings
    loop: LoopSettings

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **others) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, FlatEnvironment(settings_cls)

    @classmethod
    def of(cls, **values: Any) -> "Settings":
        """Settings from flat field values (defaults for the rest, never the environment): for tests
        and embedding, e.g. `Settings.of(home=path, auth=False, max_concurrent_jobs=2)`."""
        sections: dict[str, dict[str, Any]] = {name: {} for name in cls.model_fields}
        for key, value in values.items():
            sections[section_of(key)][key] = value
        token = _ENVIRONMENT.set({})
        try:
            return cls(**sections)
        except ValidationError as error:
            raise settings_error(error) from None
        finally:
            _ENVIRONMENT.reset(token)

    def replace(self, **changes: Any) -> "Settings":
        """A copy with flat field values changed (validated)."""
        return type(self).of(**{**self.flat(), **changes})

    def flat(self) -> dict[str, Any]:
        return {key: value for section in self.model_fields for key, value in getattr(self, section)}

    def __getattr__(self, name: str) -> Any:
        # a flat name reads its section's field or property: settings.max_pixels is settings.limits.max_pixels
        if not name.startswith("_"):
            for section in type(self).model_fields:
                values = self.__dict__.get(section)
                if values is not None and (name in type(values).model_fields
                                           or isinstance(getattr(type(values), name, None), property)):
                    return getattr(values, name)
        raise AttributeError(f"{type(self).__name__!s} has no setting {name!r}")

    # ---- derived values ----------------------------------------------------------------------
    @property
    def keys(self) -> KeySettings:
        """What models/serving/api_keys.py needs to find the key file."""
        return KeySettings(self.storage.home, self.security.api_keys_file, self.security.api_key)

    @property
    def keys_file(self) -> Path:
        return self.keys.keys_file

    @property
    def worker_count(self) -> int:
        """Workers to start: as configured, else one per GPU, else one per core.

        On CPU one worker per core with one ONNX Runtime thread each measured 1.2x the HTTP
        throughput of one worker with two threads on 2 cores (bench/serve.py, docs/benchmarks.md).
        """
        if self.serving.workers:
            return self.serving.workers
        from models.serving.runtime import cuda_device_count, default_threads

        return cuda_device_count() or default_threads(1)

    @property
    def models_to_load(self) -> list[str]:
        names = [self.models.default_model, *self.models.preload]
        return list(dict.fromkeys(n for n in names if n))

    # ---- what jobs derive: their folders and the child's command -----------------------------
    @property
    def jobs_root(self) -> Path:
        return self.storage.home / "finetune"

    @property
    def db_path(self) -> Path:
        return self.jobs_root / "jobs.sqlite3"

    @property
    def jobs_dir(self) -> Path:
        return self.jobs_root / "jobs"

    @property
    def uploads_dir(self) -> Path:
        return self.jobs_root / "uploads"

    @property
    def job_command(self) -> tuple[str, ...]:
        """The job child's argv before its own arguments: TUNESERVE_TRAINING_COMMAND split like a
        shell would, else `<training_python> -m training.run`."""
        command = self.jobs.training_command
        return tuple(shlex.split(command)) if command else (self.jobs.training_python, "-m", "training.run")

    def public(self) -> dict[str, Any]:
        """Settings as flat JSON-able values, with the API keys hidden."""
        data = self.flat()
        data["api_key"] = "set" if self.security.api_key else None
        data["api_keys"] = [name for name, _ in self.security.api_keys]
        data["allowed_formats"] = sorted(self.limits.allowed_formats)
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in data.items()}


def section_of(field_name: str) -> str:
    for section, info in Settings.model_fields.items():
        if field_name in info.annotation.model_fields:
            return section
    raise SettingsError(f"no setting named {field_name!r}")


def settings_error(error: ValidationError) -> SettingsError:
    """The first problem, naming its variable: our parsers' own messages, else pydantic's."""
    item = error.errors()[0]
    cause = item.get("ctx", {}).get("error")
    if isinstance(cause, SettingsError):
        return cause
    name = env_name(str(item["loc"][-1])) if item["loc"] else PREFIX
    return SettingsError(f"{name}={item.get('input')!r}: {cause or item['msg']}")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from `env` (default: os.environ); raises SettingsError on an invalid value."""
    env = os.environ if env is None else env
    known = {env_name(name) for section in Settings.model_fields.values() for name in section.annotation.model_fields}
    # A typo such as TUNESERVE_MAX_BODYMB would otherwise go unnoticed; a warning, not an error, because
    # other processes read TUNESERVE_* variables of their own.
    unknown = sorted(k for k in env if k.startswith(PREFIX) and k not in known | NOT_SETTINGS)
    if unknown:
        logging.getLogger("tuneserve.config").warning("ignoring unknown setting(s) %s", unknown)
    token = _ENVIRONMENT.set(env)
    try:
        settings = Settings()
    except ValidationError as error:
        raise settings_error(error) from None
    finally:
        _ENVIRONMENT.reset(token)
    if settings.limits.default_top_k > settings.limits.max_top_k:
        raise SettingsError(f"TUNESERVE_DEFAULT_TOP_K ({settings.limits.default_top_k}) exceeds "
                            f"TUNESERVE_MAX_TOP_K ({settings.limits.max_top_k})")
    return settings


def key_settings(env: Mapping[str, str] | None = None) -> KeySettings:
    """For clients on this machine: the key they send, read through the same fields as the service's
    (only the storage and security sections, so an unrelated bad variable does not stop a client)."""
    env = os.environ if env is None else env
    try:
        storage = StorageSettings(home=service_home(env), data_root=Path("/"))
        found = {n: env[env_name(n)] for n in ("api_key", "api_keys_file") if env_name(n) in env}
        security = SecuritySettings(**found)
    except ValidationError as error:
        raise settings_error(error) from None
    return KeySettings(storage.home, security.api_keys_file, security.api_key)


def shown_default(name: str, field: Any) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "shown_default" in extra:
        return str(extra["shown_default"])
    default = field.get_default(call_default_factory=True)
    if isinstance(default, (frozenset, set, tuple)):
        return ",".join(sorted(str(item) for item in default)) or "(empty)"
    if isinstance(default, bool):
        return str(default).lower()
    return "(unset)" if default is None else str(default)


def markdown() -> str:
    """docs/configuration.md: every variable, its default and meaning, by section."""
    lines = ["# Configuration", "",
             "Every setting is an environment variable, read once at start (`service/config.py`); an invalid",
             "value stops the service with a message naming the variable. Booleans take 1/0, true/false, yes/no,",
             "on/off; lists are comma-separated. This page is generated: `python -m service.config --markdown`.", ""]
    for section, info in Settings.model_fields.items():
        model: type[BaseModel] = info.annotation
        lines += [f"## {section}", "", (model.__doc__ or "").strip(), "",
                  "| Variable | Default | Meaning |", "| --- | --- | --- |"]
        for name, field in model.model_fields.items():
            text = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{env_name(name)}` | `{shown_default(name, field)}` | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m service.config --markdown > docs/configuration.md")
    sys.stdout.write(markdown())
