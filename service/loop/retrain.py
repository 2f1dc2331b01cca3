"""Fine-tune from feedback: a job whose source is the served version and whose data is the
labelled feedback (its captured images, a folder per true label), plus, when asked and still on
this machine, the version's own training data. The job is an ordinary fine-tune (service/jobs),
so the new version's manifest records its lineage (source = the served version); the loop's
events record which feedback went into which job.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from models.artifact import store
from models.data.datasets import IMAGE_SUFFIXES
from models.errors import TuneserveError
from service.loop import records
from service.loop.db import LoopDb


class NoFeedback(TuneserveError):
    status = 409


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # no copy when both are on one disk
    except OSError:
        shutil.copy2(source, target)


MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"), (b"II*", ".tif"),
         (b"MM\x00*", ".tif"))


def suffix_of(path: Path) -> str:
    """The file name suffix of a captured upload, from its first bytes (uploads keep no name)."""
    with path.open("rb") as handle:
        head = handle.read(12)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    return next((suffix for magic, suffix in MAGIC if head.startswith(magic)), ".png")


def feedback_dataset(db: LoopDb, model: str, destination: Path) -> dict[str, int]:
    """Every captured image of `model` with a true label, as `destination/<label>/<capture_id>`."""
    counts: dict[str, int] = {}
    for row in records.labelled(db, model):
        source = Path(row["path"])
        if row["label"] and source.is_file():
            _place(source, destination / row["label"] / f"{source.name}{suffix_of(source)}")
            counts[row["label"]] = counts.get(row["label"], 0) + 1
    if not counts:
        raise NoFeedback(f"{model} has no labelled captured images yet: turn capture on, review, then fine-tune")
    return counts


def training_data_of(version: store.ModelVersion) -> Path | None:
    """The folder the version was trained on, when it is still here (job datasets expire)."""
    data = ((version.manifest().training or {}).get("config") or {}).get("data")
    path = Path(data) if data else None
    return path if path is not None and path.is_dir() else None


def add_training_data(folder: Path, destination: Path) -> int:
    """The class folders of `folder` merged into `destination`; returns the images added."""
    added = 0
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and path.parent != folder:
            _place(path, destination / path.parent.name / f"train-{added}{path.suffix.lower()}")
            added += 1
    return added


def prepare(db: LoopDb, model: str, version: str, destination: Path, with_training_data: bool) -> dict[str, Any]:
    """Build the job's dataset; → what it holds (per-label feedback counts, training images added)."""
    served = store.resolve(f"{model}:{version}")
    feedback = feedback_dataset(db, model, destination)
    added = 0
    if with_training_data:
        folder = training_data_of(served)
        if folder is None:
            raise NoFeedback(f"the training data of {served.tag} is no longer on this machine; "
                             f"send with_training_data=false to fine-tune on the feedback alone")
        added = add_training_data(folder, destination)
    (destination.parent / "feedback.json").write_text(json.dumps({"source": served.tag, "feedback": feedback,
                                                                  "training_images": added}))
    return {"source": served.tag, "feedback": feedback, "training_images": added, "prepared": time.time()}
