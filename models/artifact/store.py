"""Model versions in BentoML model stores: a writable one, and the bento's baked one when served from a bento.

Using BentoML's store means `bentoml models list/export/import` and `bentoml build` work on
tuneserve models as users expect. A version becomes visible only once complete: files are
written and checked in a staging folder first, and BentoML moves `latest` after the copy.

Stores (every layout: plain checkout, built bento, container):
- writable: `$BENTOML_HOME/models`. New versions always go here (fine-tune jobs, `tuneserve
  train`); the service reads and polls it. In a container it is the path to mount as a volume.
- baked (read-only): the models a bento carries (`$BENTO_PATH/models`). When BentoML serves a
  bento it points its own model store there, while a job's child process (`python -m
  training.run`) starts with the default one; both must see both stores, so the baked one is
  found from BentoML's choice, `$BENTO_PATH`, or `TUNESERVE_BAKED_MODELS` (which the service
  exports for its children).
`name:latest` is the newest version in either store; a version says which store holds it.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from models.artifact.bentoml_stores import active_store_dir, configured_store_dir, model_store
from models.artifact.manifest import MANIFEST_FILE, ONNX_FILE, Manifest, eval_summary, read_eval, read_manifest
from models.errors import ManifestError, ModelNotFound, ReadOnlyModel, StorageFull, is_disk_full

log = logging.getLogger("tuneserve.models")

MODULE = "tuneserve"
BAKED_ENV = "TUNESERVE_BAKED_MODELS"
WRITABLE, BAKED = "writable", "baked"
NAME_PATTERN = re.compile(  # a model name or version; the service declares it in its OpenAPI too
    r"^[a-z0-9]([a-z0-9_.-]{0,62}[a-z0-9])?$")


@dataclass(frozen=True)
class StoreLocation:
    path: Path
    kind: str  # WRITABLE or BAKED

    @property
    def writable(self) -> bool:
        return self.kind == WRITABLE


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    path: Path
    created: datetime | None = None
    store: str = WRITABLE  # which store holds it: WRITABLE or BAKED

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    def manifest(self) -> Manifest:
        return read_manifest(self.path)

    def eval_report(self) -> dict[str, Any] | None:
        return read_eval(self.path)


def validate_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise ManifestError(
            f"invalid model name {name!r}: use 1-64 lowercase letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return name


def split_ref(ref: str) -> tuple[str, str]:
    """`name` or `name:version` → (name, version or 'latest')."""
    name, _, version = ref.partition(":")
    version = version.strip() or "latest"
    if not NAME_PATTERN.match(version):
        raise ManifestError(f"invalid model version {version!r} in {ref!r}: versions are lowercase letters and digits")
    return validate_name(name.strip().lower()), version


def _bentoml():
    import bentoml  # imported late: CLI commands that never touch the store start faster

    return bentoml


def writable_root() -> Path:
    """`$BENTOML_HOME/models`: BentoML keeps this path even when it serves a bento's baked models."""
    return configured_store_dir()


def _bento_models(bento_path: str | None) -> Path | None:
    if bento_path and (Path(bento_path) / "bento.yaml").is_file() and (Path(bento_path) / "models").is_dir():
        return Path(bento_path) / "models"
    return None


def baked_root() -> Path | None:
    """The bento's own model folder when this process serves (or was started by) a bento."""
    explicit = os.environ.get(BAKED_ENV)
    if explicit:
        return Path(explicit).resolve()
    current = active_store_dir()
    if current != writable_root():
        return current
    found = _bento_models(os.environ.get("BENTO_PATH"))
    return found.resolve() if found else None


def stores() -> list[StoreLocation]:
    """Writable store first, then the baked one (if any, and not the same folder)."""
    locations = [StoreLocation(writable_root(), WRITABLE)]
    baked = baked_root()
    if baked is not None and baked != locations[0].path:
        locations.append(StoreLocation(baked, BAKED))
    return locations


def export_for_children() -> None:
    """Let processes this one starts (fine-tune jobs) see the same baked store: they are not
    loaded by BentoML from the bento, so they would only see the writable one."""
    baked = baked_root()
    if baked is not None and not os.environ.get(BAKED_ENV):
        os.environ[BAKED_ENV] = str(baked)


def _ours(model) -> bool:
    return model.info.module == MODULE


def _version_of(model, location: StoreLocation) -> ModelVersion:
    return ModelVersion(
        name=model.tag.name,
        version=model.tag.version,
        path=Path(model.path),
        created=model.info.creation_time,
        store=location.kind,
    )


def list_models() -> dict[str, list[ModelVersion]]:
    """Every tuneserve model name → its versions in every store, newest first (a version found
    in both stores is listed once, from the writable one)."""
    found: dict[str, dict[str, ModelVersion]] = {}
    for location in stores():
        for model in _bentoml().models.list(_model_store=model_store(location.path)):
            if _ours(model):
                found.setdefault(model.tag.name, {}).setdefault(model.tag.version, _version_of(model, location))
    ordered = {}
    for name, versions in sorted(found.items()):
        ordered[name] = sorted(versions.values(), key=lambda v: v.created or datetime.min, reverse=True)
    return ordered


def resolve(ref: str) -> ModelVersion:
    """`name`, `name:latest` or `name:version` → the stored version (in any store), or a clear error."""
    name, version = split_ref(ref)
    if version == "latest":
        version = latest_version(name) or version
    bentoml = _bentoml()
    for location in stores():
        try:
            model = bentoml.models.get(f"{name}:{version}", _model_store=model_store(location.path))
        except (bentoml.exceptions.NotFound, bentoml.exceptions.BentoMLException):
            continue
        if not _ours(model):
            raise ModelNotFound(f"{model.tag} is a BentoML model but not a tuneserve model")
        return _version_of(model, location)
    known = list_models()
    if name not in known:
        raise ModelNotFound(f"unknown model {name!r}; known models: {sorted(known) or 'none'}")
    versions = [v.version for v in known[name]]
    raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: {versions}")


@functools.lru_cache(maxsize=1024)
def _created(version_dir: str) -> str:
    """A version's creation time as BentoML wrote it (ISO text sorts in time order); versions
    never change once complete, so this is cached."""
    try:
        for line in (Path(version_dir) / "model.yaml").read_text().splitlines():
            if line.startswith("creation_time:"):
                return line.split(":", 1)[1].strip().strip("'\"")
    except OSError:
        pass
    return ""


def _pointed(root: Path, name: str) -> str | None:
    """The version one store's `latest` pointer file names."""
    try:
        return (root / name / "latest").read_text().strip() or None
    except OSError:
        return None


def latest_version(name: str) -> str | None:
    """The newest version `latest` points at in any store, read straight from the stores'
    pointer files (cheap enough to poll)."""
    candidates = []
    for location in stores():
        pointed = _pointed(location.path, name)
        if pointed:
            candidates.append((_created(str(location.path / name / pointed)), pointed))
    return max(candidates)[1] if candidates else None


def check_complete(directory: str | Path) -> Manifest:
    directory = Path(directory)
    manifest = read_manifest(directory)
    if not (directory / ONNX_FILE).is_file():
        raise ManifestError(f"no {ONNX_FILE} in {directory}")
    return manifest


def publish(name: str, staging_dir: str | Path, metadata: dict[str, Any] | None = None) -> ModelVersion:
    """Copy a finished, checked version from `staging_dir` into the writable store; `latest` moves last."""
    validate_name(name)
    staging_dir = Path(staging_dir)
    manifest = check_complete(staging_dir)
    labels = {"backbone": manifest.backbone[:63], "kind": "image-classifier"}
    info = {"source": manifest.source, "classes": manifest.num_classes, **(metadata or {})}
    summary = eval_summary(read_eval(staging_dir))
    if summary:
        info["accuracy"] = summary.get("accuracy")
    writable = stores()[0]
    previous = _pointed(writable.path, name)
    model = None
    try:
        with _bentoml().models.create(name, module=MODULE, labels=labels, metadata=info,
                                      _model_store=model_store(writable.path)) as model:
            for item in staging_dir.iterdir():
                target = Path(model.path) / item.name
                if item.is_dir():
                    shutil.copytree(item, target)
                else:
                    shutil.copy2(item, target)
    except OSError as error:
        if not is_disk_full(error):
            raise
        _undo_publish(writable.path, name, model.tag.version if model is not None else None, previous)
        free = shutil.disk_usage(writable.path).free
        log.error("no space left on the model store's disk (%s, %d bytes free) publishing %s", writable.path, free, name)
        raise StorageFull(  # no server path in the answer: it stays in the log above
            f"no space left on the model store's disk ({free} bytes free) while publishing "
            f"{name!r}: nothing was published; {name}:latest is still {latest_version(name) or 'absent'}"
        ) from None
    return resolve(f"{name}:{model.tag.version}")


def _undo_publish(root: Path, name: str, version: str | None, previous: str | None) -> None:
    """After a failed publish: no partial version folder, `latest` (in that store) as it was."""
    folder = root / name
    if version:
        shutil.rmtree(folder / version.lower(), ignore_errors=True)
    pointer = folder / "latest"
    if _pointed(root, name) != previous:
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
    if version.store != WRITABLE:
        raise ReadOnlyModel(f"{version.tag} is baked into the bento (read-only); build a bento without it instead")
    _bentoml().models.delete(version.tag, _model_store=model_store(stores()[0].path))


def describe(version: ModelVersion, full: bool = False) -> dict[str, Any]:
    manifest = version.manifest()
    entry: dict[str, Any] = {
        "version": version.version,
        "created": version.created.isoformat() if version.created else None,
        "store": version.store,
        **manifest.summary(),
        "eval": eval_summary(version.eval_report()),
    }
    if full:
        entry["manifest"] = manifest.model_dump(mode="json")
        entry["eval_report"] = version.eval_report()
    return entry


__all__ = [
    "BAKED",
    "BAKED_ENV",
    "MANIFEST_FILE",
    "ModelVersion",
    "StoreLocation",
    "WRITABLE",
    "baked_root",
    "check_complete",
    "delete",
    "describe",
    "export_for_children",
    "latest_version",
    "list_models",
    "publish",
    "resolve",
    "split_ref",
    "stores",
    "validate_name",
    "writable_root",
]
