"""Model versions in the BentoML model store (`$BENTOML_HOME/models/<name>/<version>`).

Using BentoML's store means `bentoml models list/export/import` and `bentoml build` work on
tuneserve models as users expect. A version becomes visible only once complete: files are
written and checked in a staging folder first, and BentoML moves `latest` after the copy.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from models.errors import ManifestError, ModelNotFound, StorageFull, is_disk_full
from models.manifest import MANIFEST_FILE, ONNX_FILE, Manifest, eval_summary, read_eval, read_manifest

MODULE = "tuneserve"
_NAME = re.compile(r"^[a-z0-9]([a-z0-9_.-]{0,62}[a-z0-9])?$")


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    path: Path
    created: datetime | None = None

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    def manifest(self) -> Manifest:
        return read_manifest(self.path)

    def eval_report(self) -> dict[str, Any] | None:
        return read_eval(self.path)


def validate_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise ManifestError(
            f"invalid model name {name!r}: use 1-64 lowercase letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return name


def split_ref(ref: str) -> tuple[str, str]:
    """`name` or `name:version` → (name, version or 'latest')."""
    name, _, version = ref.partition(":")
    version = version.strip() or "latest"
    if not _NAME.match(version):
        raise ManifestError(f"invalid model version {version!r} in {ref!r}: versions are lowercase letters and digits")
    return validate_name(name.strip().lower()), version


def _bentoml():
    import bentoml  # imported late: CLI commands that never touch the store start faster

    return bentoml


def _store_root() -> Path:
    # BentoML has no public accessor for the store folder; the `latest` pointer file in it is
    # what makes polling for new versions one small read instead of a store scan.
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.model_store.get()._path)


def _ours(model) -> bool:
    return model.info.module == MODULE


def _version_of(model) -> ModelVersion:
    return ModelVersion(
        name=model.tag.name,
        version=model.tag.version,
        path=Path(model.path),
        created=model.info.creation_time,
    )


def list_models() -> dict[str, list[ModelVersion]]:
    """Every tuneserve model name → its versions, newest first."""
    found: dict[str, list[ModelVersion]] = {}
    for model in _bentoml().models.list():
        if _ours(model):
            found.setdefault(model.tag.name, []).append(_version_of(model))
    for versions in found.values():
        versions.sort(key=lambda v: v.created or datetime.min, reverse=True)
    return dict(sorted(found.items()))


def resolve(ref: str) -> ModelVersion:
    """`name`, `name:latest` or `name:version` → the stored version, or a clear error."""
    name, version = split_ref(ref)
    bentoml = _bentoml()
    try:
        model = bentoml.models.get(f"{name}:{version}")
    except (bentoml.exceptions.NotFound, bentoml.exceptions.BentoMLException):
        known = list_models()
        if name not in known:
            raise ModelNotFound(f"unknown model {name!r}; known models: {sorted(known) or 'none'}") from None
        versions = [v.version for v in known[name]]
        raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: {versions}") from None
    if not _ours(model):
        raise ModelNotFound(f"{model.tag} is a BentoML model but not a tuneserve model")
    return _version_of(model)


def latest_version(name: str) -> str | None:
    """The version `latest` points at, read straight from the store (cheap enough to poll)."""
    pointer = _store_root() / name / "latest"
    try:
        return pointer.read_text().strip() or None
    except OSError:
        return None


def check_complete(directory: str | Path) -> Manifest:
    directory = Path(directory)
    manifest = read_manifest(directory)
    if not (directory / ONNX_FILE).is_file():
        raise ManifestError(f"no {ONNX_FILE} in {directory}")
    return manifest


def publish(name: str, staging_dir: str | Path, metadata: dict[str, Any] | None = None) -> ModelVersion:
    """Copy a finished, checked version from `staging_dir` into the store; `latest` moves last."""
    validate_name(name)
    staging_dir = Path(staging_dir)
    manifest = check_complete(staging_dir)
    labels = {"backbone": manifest.backbone[:63], "kind": "image-classifier"}
    info = {"source": manifest.source, "classes": manifest.num_classes, **(metadata or {})}
    summary = eval_summary(read_eval(staging_dir))
    if summary:
        info["accuracy"] = summary.get("accuracy")
    previous = latest_version(name)
    model = None
    try:
        with _bentoml().models.create(name, module=MODULE, labels=labels, metadata=info) as model:
            for item in staging_dir.iterdir():
                target = Path(model.path) / item.name
                if item.is_dir():
                    shutil.copytree(item, target)
                else:
                    shutil.copy2(item, target)
    except OSError as error:
        if not is_disk_full(error):
            raise
        _undo_publish(name, model.tag.version if model is not None else None, previous)
        free = shutil.disk_usage(_store_root()).free
        raise StorageFull(
            f"no space left on the model store's disk ({_store_root()}, {free} bytes free) while publishing "
            f"{name!r}: nothing was published; {name}:latest is still {previous or 'absent'}"
        ) from None
    return resolve(f"{name}:{model.tag.version}")


def _undo_publish(name: str, version: str | None, previous: str | None) -> None:
    """After a failed publish: no partial version folder, `latest` as it was."""
    folder = _store_root() / name
    if version:
        shutil.rmtree(folder / version.lower(), ignore_errors=True)
    pointer = folder / "latest"
    if latest_version(name) != previous:
        if previous is None:
            pointer.unlink(missing_ok=True)
        else:
            pointer.write_text(previous)  # room exists again: the partial version is gone
    try:
        folder.rmdir()  # only when no version is left (a first publish that failed)
    except OSError:
        pass


def delete(ref: str) -> None:
    version = resolve(ref)
    _bentoml().models.delete(version.tag)


def describe(version: ModelVersion, full: bool = False) -> dict[str, Any]:
    manifest = version.manifest()
    entry: dict[str, Any] = {
        "version": version.version,
        "created": version.created.isoformat() if version.created else None,
        **manifest.summary(),
        "eval": eval_summary(version.eval_report()),
    }
    if full:
        entry["manifest"] = manifest.model_dump(mode="json")
        entry["eval_report"] = version.eval_report()
    return entry


__all__ = [
    "MANIFEST_FILE",
    "ModelVersion",
    "check_complete",
    "delete",
    "describe",
    "latest_version",
    "list_models",
    "publish",
    "resolve",
    "split_ref",
    "validate_name",
]
