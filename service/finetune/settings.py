"""Job settings are fields of the one settings model (service/config.py: its `jobs` section, and
`jobs_dir`, `db_path`, `job_command`, … derived from it); nothing is declared here.

`FinetuneSettings(...)` builds that model from the keyword names jobs used before (grace_seconds,
min_per_class, byte counts, an argv tuple) for callers that still pass them.
"""
from __future__ import annotations

import shlex
from typing import Any

from models.datasets import MIB
from service.config import Settings

RENAMED = {"grace_seconds": "job_grace_seconds", "min_per_class": "finetune_min_per_class",
           "max_entries": "max_zip_entries"}
IN_MIB = {"max_upload_bytes": "finetune_max_upload_mb", "max_unpacked_bytes": "max_unpacked_mb",
          "disk_budget_bytes": "finetune_disk_budget_mb", "min_free_bytes": "finetune_min_free_mb"}


def FinetuneSettings(**values: Any) -> Settings:  # noqa: N802 - keeps the old constructor's name
    fields: dict[str, Any] = {}
    for key, value in values.items():
        if key in IN_MIB:
            fields[IN_MIB[key]] = value / MIB
        elif key == "retention_seconds":
            fields["finetune_retention_hours"] = value / 3600.0
        elif key == "training_command":
            fields[key] = shlex.join(value) if isinstance(value, (tuple, list)) else value
        elif key == "data_root" and value is None:
            continue  # the data root defaults to home/data
        else:
            fields[RENAMED.get(key, key)] = value
    return Settings.of(**fields)
