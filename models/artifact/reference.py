"""The drift reference of a version: what its served traffic should look like.

Written at export next to `ood.npz` (models/serving/trust.py), from the validation split: a random sample
of at most `MAX_REFERENCE` embeddings, the true label counts and the predicted label counts. The
service compares windows of served traffic against it (service/loop/drift.py). Versions exported
before it existed simply have no embedding drift test.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

REFERENCE_FILE = "drift_reference.npz"
MAX_REFERENCE = 300  # rows kept: enough for a two-sample test, small next to the graph (float16)


@dataclass
class Reference:
    embeddings: np.ndarray  # [N, D] validation embeddings (a random sample)
    label_counts: dict[str, int]  # true labels of the validation split
    predicted_counts: dict[str, int]  # what the version predicted on it

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / REFERENCE_FILE
        labels = sorted(set(self.label_counts) | set(self.predicted_counts))
        np.savez_compressed(
            path,
            embeddings=self.embeddings.astype(np.float16),
            labels=np.array(labels),
            label_counts=np.array([self.label_counts.get(x, 0) for x in labels], dtype=np.int64),
            predicted_counts=np.array([self.predicted_counts.get(x, 0) for x in labels], dtype=np.int64),
        )
        return path


def build_reference(embeddings: np.ndarray, true: np.ndarray, predicted: np.ndarray, labels: list[str],
                    limit: int = MAX_REFERENCE, seed: int = 0) -> Reference:
    """A reference from validation embeddings `[N, D]`, true and predicted label indices `[N]`."""
    rng = np.random.default_rng(seed)
    keep = rng.permutation(len(embeddings))[:limit]

    def counts(indices: np.ndarray) -> dict[str, int]:
        found = np.bincount(np.asarray(indices, dtype=np.int64), minlength=len(labels))
        return {label: int(n) for label, n in zip(labels, found)}

    return Reference(np.asarray(embeddings)[keep], counts(true), counts(predicted))


def load_reference(directory: str | Path) -> Reference | None:
    """The version's reference, or None when it was exported without one."""
    path = Path(directory) / REFERENCE_FILE
    if not path.is_file():
        return None
    with np.load(path) as data:
        labels = [str(x) for x in data["labels"]]
        return Reference(
            data["embeddings"].astype(np.float32),
            dict(zip(labels, (int(n) for n in data["label_counts"]))),
            dict(zip(labels, (int(n) for n in data["predicted_counts"]))),
        )
