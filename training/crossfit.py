"""Val logits for calibration from heads that never saw the row (cross-fitting).

auto's cheap heads pick their settings on val and are then refitted on train + val (with ten images
per class the val images are too many to leave out). Calibration (models/serving/trust.py: the
temperature, the per-label thresholds, the drift reference) is fitted on val logits, and the
published head's own val logits are those of rows it was fitted on: nearly all right and confident,
so the temperature stays at 1 or sharpens, and served probabilities are over-confident.

Here the val rows are dealt into `FOLDS` folds; for each fold the chosen head is refitted exactly
as published (same kind, same C) on train + the other folds and scores the fold. Every val row gets
a logit vector from a head that never saw it, one fold's rows short of the published head; calibration
is fitted on those. It keeps every row in the published head (a held-out slice would cost the head
rows and leave calibration a handful) for `FOLDS` extra fits of one head.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import numpy as np

from training.multidepth import fit_fixed
from training.train import TrainResult

FOLDS = 3
CROSS_FITTED = ("prototype", "logistic", "multidepth")  # refitted on val; a fine-tune only early-stops on it


@dataclass
class CalibratedResult(TrainResult):
    """A TrainResult with the val logits calibration should be fitted on (None: the exported graph's own)."""

    calibration_logits: np.ndarray | None = None


def with_calibration(result: TrainResult, logits: np.ndarray | None) -> CalibratedResult:
    return CalibratedResult(**{f.name: getattr(result, f.name) for f in fields(result)}, calibration_logits=logits)


def folds_of(y: np.ndarray, folds: int = FOLDS) -> list[np.ndarray]:
    """Val row indices dealt class by class over `folds` folds: each fold takes a share of every class,
    so the heads fitted without it still see each class."""
    order = np.argsort(y, kind="stable")
    fold = np.empty(len(y), dtype=np.int64)
    fold[order] = np.arange(len(y)) % folds
    return [np.flatnonzero(fold == k) for k in range(folds) if (fold == k).any()]


def fold_head(strategy: str, details: dict[str, Any], x: np.ndarray, y: np.ndarray, dim: int, num_classes: int,
              balanced: bool) -> Callable[[np.ndarray], np.ndarray]:
    """The chosen head refitted on (x, y) as run_auto refits it → its logits on feature rows."""
    if strategy == "prototype":
        from models.transfer.heads import fit_prototype

        head = fit_prototype(x[:, -dim:], y, num_classes)
        return lambda rows: head.logits(rows[:, -dim:])
    columns = slice(-dim, None) if strategy == "logistic" else slice(None)
    fitted = fit_fixed(x[:, columns], y, details["c"], num_classes, balanced)
    return lambda rows: fitted.logits(rows[:, columns])


def crossfit_logits(strategy: str, details: dict[str, Any], features, num_classes: int,
                    balanced: bool) -> np.ndarray | None:
    """[n_val, C] val logits, each from the chosen head refitted without that row's fold; None where the
    chosen candidate did not train on val or there are too few val rows to fold."""
    n_val = len(features.val_y)
    if strategy not in CROSS_FITTED or n_val < 2 or not details.get("refitted_on_val", True):
        return None  # a head that never saw val (a streamed one) is calibrated on its own val logits
    logits = np.zeros((n_val, num_classes), dtype=np.float32)
    for fold in folds_of(features.val_y):
        rest = np.setdiff1d(np.arange(n_val), fold)
        x = np.concatenate([features.train_x, features.val_x[rest]])
        y = np.concatenate([features.train_y, features.val_y[rest]])
        head = fold_head(strategy, details, x, y, features.embedding_dim, num_classes, balanced)
        logits[fold] = head(features.val_x[fold])
    return logits
