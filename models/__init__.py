"""The contract between training and serving: manifest, store, preprocessing, runtime.

Nothing here imports torch or knows HTTP, so a serving worker stays small.
"""
from models.errors import (
    ImageError,
    ImageTooLarge,
    InvalidImage,
    ManifestError,
    ModelNotFound,
    TuneserveError,
    DatasetError,
)

__all__ = [
    "DatasetError",
    "ImageError",
    "ImageTooLarge",
    "InvalidImage",
    "ManifestError",
    "ModelNotFound",
    "TuneserveError",
]
