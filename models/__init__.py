"""The contract between training and serving, torch-free and without HTTP, in sub-packages by idea:
artifact/ (what a version is, where it lives), serving/ (running one), data/ (datasets, metrics),
transfer/ (transfer tools: never loaded by a serving worker) and jobs/ (the job contract).
The errors every part raises are re-exported here.
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
