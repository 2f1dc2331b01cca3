"""The settings model: every variable keeps its name and default, each is documented once, and
docs/configuration.md is the page the model generates."""
from pathlib import Path

import pytest

from service.config import Settings, SettingsError, env_name, key_settings, load_settings, markdown

ROOT = Path(__file__).resolve().parent.parent

# Every variable the service read before the settings became one model, with its default.
VARIABLES = {
    "HOME": None, "DATA_ROOT": None, "DEFAULT_MODEL": "imagenet", "PRELOAD": (), "POLL_SECONDS": 2.0,
    "MAX_LOADED_MODELS": 8, "AUTH": True, "API_KEY": None, "API_KEYS": (), "API_KEYS_FILE": None,
    "PROTECT_READS": False, "MAX_BODY_MB": 20.0, "MAX_PIXELS": 40_000_000, "MAX_BATCH": 64, "MAX_TOP_K": 100,
    "DEFAULT_TOP_K": 5, "ALLOWED_FORMATS": None, "MAX_ZIP_ENTRIES": 50_000, "MAX_UNPACKED_MB": 2048.0,
    "DEVICE": "auto", "TENSORRT": False, "FP16": False, "PRECISION": "auto", "THREADS": 0, "WORKERS": 0,
    "DECODE_THREADS": 0, "BATCH_MAX_SIZE": 32, "BATCH_MAX_LATENCY_MS": 0.0, "ACCESS_LOG": True,
    "MAX_CONCURRENT_JOBS": 1, "JOB_GRACE_SECONDS": 10.0, "TRAINING_PYTHON": None, "TRAINING_COMMAND": None,
    "FINETUNE_MAX_UPLOAD_MB": 500.0, "FINETUNE_MIN_PER_CLASS": 5, "JOB_BACKEND": "local", "RAY_ADDRESS": None,
    "RAY_NUM_CPUS": 1.0, "RAY_NUM_GPUS": 0.0, "MAX_JOBS_PER_KEY": 4, "MAX_JOBS_TOTAL": 16,
    "FINETUNE_DISK_BUDGET_MB": 20480.0, "FINETUNE_RETENTION_HOURS": 168.0, "FINETUNE_MIN_FREE_MB": 64.0,
    "LOOP_MAX_RECORDS": 100_000, "CAPTURE_MODELS": (), "CAPTURE_FRACTION": 0.05, "CAPTURE_MAX_MB": 1024.0,
    "CAPTURE_MAX_ITEMS": 10_000, "CAPTURE_MAX_AGE_HOURS": 168.0, "CAPTURE_MIN_FREE_MB": 256.0,
    "DRIFT_FRACTION": 0.25, "DRIFT_WINDOW": 200, "DRIFT_MAX_SAMPLES": 2000, "DRIFT_INTERVAL_S": 30.0,
    "DRIFT_ALPHA": 0.01, "LOOP_REFRESH_S": 1.0, "AUTO_PROMOTE": False, "AUTO_PROMOTE_MIN_FEEDBACK": 100,
    "AUTO_PROMOTE_MARGIN": 0.0,
}


def fields() -> dict[str, tuple[str, object]]:
    """variable → (section, field info) for every field of every section."""
    return {env_name(name): (section, field) for section, info in Settings.model_fields.items()
            for name, field in info.annotation.model_fields.items()}


def test_every_variable_keeps_its_name_and_default(tmp_path):
    expected = {f"TUNESERVE_{name}" for name in VARIABLES}
    assert expected <= set(fields()), sorted(expected - set(fields()))
    settings = load_settings({"BENTOML_HOME": str(tmp_path)})
    for name, default in VARIABLES.items():
        if default is not None:
            assert getattr(settings, name.lower()) == default, name


def test_every_field_is_documented_once_and_the_page_is_current():
    for variable, (section, field) in fields().items():
        assert field.description and len(field.description) > 10, f"{variable} needs a description"
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == markdown(), "docs/configuration.md is stale: python -m service.config --markdown > docs/configuration.md"
    for variable in fields():
        assert page.count(f"`{variable}`") == 1


def test_sections_and_flat_names_read_the_same_values(tmp_path):
    settings = load_settings({"TUNESERVE_HOME": str(tmp_path), "TUNESERVE_MAX_PIXELS": "1000", "TUNESERVE_AUTH": "off"})
    assert settings.limits.max_pixels == settings.max_pixels == 1000
    assert settings.security.auth is False and settings.storage.data_root == (tmp_path / "data").resolve()
    assert settings.max_body_bytes == 20 * 1024 * 1024  # a section's property, by its flat name too
    with pytest.raises(AttributeError, match="no setting 'max_pixel'"):
        settings.max_pixel
    changed = settings.replace(max_concurrent_jobs=3)
    assert changed.jobs.max_concurrent_jobs == 3 and changed.max_pixels == 1000
    with pytest.raises(SettingsError, match="TUNESERVE_MAX_CONCURRENT_JOBS='0': must be at least 1"):
        Settings.of(home=tmp_path, max_concurrent_jobs=0)  # a Python value is checked like the variable


def test_an_invalid_value_names_its_variable_and_what_is_expected():
    with pytest.raises(SettingsError, match=r"TUNESERVE_DRIFT_ALPHA='2': must be between 0 and 1"):
        load_settings({"TUNESERVE_DRIFT_ALPHA": "2"})
    with pytest.raises(SettingsError, match="TUNESERVE_DEFAULT_TOP_K \\(9\\) exceeds TUNESERVE_MAX_TOP_K \\(3\\)"):
        load_settings({"TUNESERVE_DEFAULT_TOP_K": "9", "TUNESERVE_MAX_TOP_K": "3"})


def test_clients_read_only_the_key_settings(tmp_path):
    keys = key_settings({"TUNESERVE_HOME": str(tmp_path), "TUNESERVE_MAX_BODY_MB": "lots", "TUNESERVE_API_KEY": " k "})
    assert keys.keys_file == tmp_path.resolve() / "api-keys" and keys.api_key == "k"
