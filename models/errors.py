"""Errors the contract raises; the service maps each to an HTTP status."""
from __future__ import annotations

import errno


class TuneserveError(Exception):
    """Base class; `status` is the HTTP status a service should answer with."""

    status = 400


class ModelNotFound(TuneserveError, LookupError):
    status = 404


class ManifestError(TuneserveError, ValueError):
    status = 422


class ImageError(TuneserveError, ValueError):
    status = 400


class InvalidImage(ImageError):
    status = 400


class UnsupportedImageFormat(ImageError):
    status = 415


class ImageTooLarge(ImageError):
    status = 413


class DatasetError(TuneserveError, ValueError):
    status = 422


class ReadOnlyModel(TuneserveError):
    """A version in a read-only store (the models baked into a bento) cannot be changed."""

    status = 409


class EmbeddingUnavailable(TuneserveError):
    """A model version exported before `model.onnx` had an `embedding` output: it still classifies,
    but features that need its embedding (advise, instant heads, in-domain score) refuse it."""

    status = 409


class Cancelled(TuneserveError):
    """Raised inside a job when its stop event is set (SIGTERM / job cancel)."""

    status = 409


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC/EDQUOT (also inside shutil.copytree's gathered shutil.Error) or SQLite's 'database or disk is full'."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error) or "quota exceeded" in str(error)
    return type(error).__module__ == "sqlite3" and "full" in str(error).lower()


class StorageFull(TuneserveError, OSError):
    """No space left where something had to be written; nothing partial was kept."""

    status = 507
