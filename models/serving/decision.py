"""Answer or abstain: `min_confidence` (a number, or `auto`) and the in-domain score → the prediction.

One rule for every surface (`/classify`, `/classify_batch`, `/v2`, `tuneserve score`):
- no `min_confidence`: always answer the top label (the behaviour before abstention existed);
- a number t: abstain when the top probability is below t;
- `auto`: abstain when the top probability is below that label's best-F1 threshold from the
  manifest, or when the image is out of domain (in-domain score below the manifest's threshold).
An abstention keeps the ranked predictions, so a caller can still look at them.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Union

from models.serving.calibration import DEFAULT_THRESHOLD
from models.errors import TuneserveError
from models.artifact.manifest import Manifest

AUTO = "auto"
MinConfidence = Union[float, Literal["auto"], None]


class InvalidMinConfidence(TuneserveError, ValueError):
    status = 422


def parse_min_confidence(raw: Any) -> MinConfidence:
    """None/empty → None; 'auto' → AUTO; else a probability in [0, 1]."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, str) and raw.strip().lower() == AUTO:
        return AUTO
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise InvalidMinConfidence(f"min_confidence must be a number in [0, 1] or 'auto', got {raw!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidMinConfidence(f"min_confidence must be between 0 and 1 (or 'auto'), got {raw!r}")
    return value


def check_supported(min_confidence: MinConfidence, manifest: Manifest, model_tag: str) -> None:
    """`auto` needs the per-label thresholds that export writes; older versions have none."""
    if min_confidence == AUTO and manifest.thresholds is None:
        raise InvalidMinConfidence(
            f"model {model_tag} has no per-label thresholds (exported before calibration existed), so "
            "min_confidence=auto cannot apply; pass a number such as min_confidence=0.5"
        )


def out_of_domain(manifest: Manifest, in_domain: float | None) -> bool:
    return in_domain is not None and manifest.ood is not None and in_domain < manifest.ood.threshold


def decide(manifest: Manifest, predictions: list[dict[str, Any]], min_confidence: MinConfidence = None,
           in_domain: float | None = None) -> dict[str, Any]:
    """label/probability/abstained/in_domain/predictions for one image; `predictions` ranked, top first."""
    top = predictions[0]
    if min_confidence == AUTO:
        cut = (manifest.thresholds or {}).get(top["label"], DEFAULT_THRESHOLD)
        abstained = top["probability"] < cut or out_of_domain(manifest, in_domain)
    elif min_confidence is not None:
        abstained = top["probability"] < min_confidence
    else:
        abstained = False
    return {
        "label": None if abstained else top["label"],
        "probability": top["probability"],
        "abstained": bool(abstained),
        "in_domain": None if in_domain is None else round(float(in_domain), 4),
        "predictions": predictions,
    }
