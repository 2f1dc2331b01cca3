"""Which flips and quarter turns keep the label, measured on the data instead of guessed from it.

A transform T keeps the label when the data are (in distribution) invariant to it: then a head
fitted on the untransformed train images scores as well on T(val) as on val. A digit flipped is
another symbol (or none): the head's score on flipped val images collapses. A crack or a texture
turned is still a crack or a texture, and the train split already holds them at every angle: the
score holds. So each generator of the square's symmetry group (horizontal flip, vertical flip,
quarter turn) is kept when the paired drop in val accuracy is within noise, and the views used
for augmentation (and maybe test-time averaging) are the group those generators make.

Views act on uint8 NHWC batches (what the datasets yield) or, with `spatial=(2, 3)`, on NCHW maps.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

GENERATORS = ("hflip", "vflip", "rot90")
TOLERANCE = 0.01  # a drop this small (accuracy) is kept even when the val split is large
NOISE_SE = 2.0  # ... plus this many standard errors of the paired difference
TTA_MIN_GAIN = 0.01  # val macro F1 test-time averaging must add to be served (it multiplies serving cost)

# every element of the square's symmetry group as (quarter turns, then a horizontal flip?)
ELEMENTS = {"identity": (0, False), "hflip": (0, True), "rot90": (1, False), "rot180": (2, False),
            "rot270": (3, False), "vflip": (2, True), "transpose": (3, True), "antitranspose": (1, True)}


def apply_view(x: torch.Tensor, view: str, spatial: tuple[int, int] = (1, 2)) -> torch.Tensor:
    """`x` under the named symmetry (square images: a quarter turn keeps the shape)."""
    turns, flip = ELEMENTS[view]
    if turns:
        x = torch.rot90(x, turns, spatial)
    return torch.flip(x, (spatial[1],)) if flip else x


def group_of(kept: list[str]) -> list[str]:
    """The views the kept generators make, identity first, then the generators, then their products."""
    if "rot90" in kept and ("hflip" in kept or "vflip" in kept):
        return list(ELEMENTS)
    if "rot90" in kept:
        return ["identity", "rot90", "rot180", "rot270"]
    if "hflip" in kept and "vflip" in kept:
        return ["identity", "hflip", "vflip", "rot180"]
    return ["identity", *kept]


@dataclass
class Invariance:
    """What was measured and decided; recorded in the recipe."""

    kept: list[str]
    views: list[str]
    scores: dict[str, float] = field(default_factory=dict)  # val accuracy of the fitted head per view
    why: str = ""
    tta: bool = False
    tta_gain: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "scores": {k: round(v, 4) for k, v in self.scores.items()}}


def keeps_label(base_correct: np.ndarray, view_correct: np.ndarray) -> tuple[bool, float, float]:
    """(kept, drop, allowed): the paired drop in accuracy against what noise and TOLERANCE allow."""
    diff = base_correct.astype(float) - view_correct.astype(float)
    drop = float(diff.mean()) if len(diff) else 1.0
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 1.0
    allowed = TOLERANCE + NOISE_SE * se
    return drop <= allowed, drop, allowed


def decide(predict: Callable[[np.ndarray], np.ndarray], val_by_view: dict[str, np.ndarray],
           val_y: np.ndarray) -> Invariance:
    """Keep each generator whose transformed val images the head (fitted on untransformed train) still
    classifies as well; `predict` maps features to class indices, `val_by_view` has 'identity'."""
    base = predict(val_by_view["identity"]) == val_y
    kept, scores, reasons = [], {"identity": float(base.mean())}, []
    for view in GENERATORS:
        if view not in val_by_view:
            continue
        correct = predict(val_by_view[view]) == val_y
        scores[view] = float(correct.mean())
        ok, drop, allowed = keeps_label(base, correct)
        kept += [view] if ok else []
        reasons.append(f"{view} {'keeps' if ok else 'changes'} the label (val accuracy {scores[view]:.3f} against "
                       f"{scores['identity']:.3f}: drop {drop:+.3f}, noise allows {allowed:.3f})")
    views = group_of(kept)
    why = ("a head fitted on untransformed train images, scored on transformed val images: " + "; ".join(reasons)
           + f"; views {', '.join(views)}")
    return Invariance(kept, views, scores, why)


def averaged_gain(logits: Callable[[np.ndarray], np.ndarray], val_by_view: dict[str, np.ndarray],
                  val_y: np.ndarray, views: list[str], score: Callable[[np.ndarray, np.ndarray], float]) -> float:
    """Val score of logits averaged over the measured `views` (as `ViewAveraged` serves them) minus the
    identity view's alone."""
    present = [v for v in views if v in val_by_view]
    single = score(val_y, logits(val_by_view["identity"]).argmax(1))
    mean = np.mean([logits(val_by_view[v]) for v in present], 0)
    return float(score(val_y, mean.argmax(1)) - single)


class ViewAveraged(torch.nn.Module):
    """A classifier whose logits are averaged over symmetric views of its (NCHW) input: test-time
    augmentation inside the exported graph. The embedding stays the identity view's."""

    def __init__(self, inner: torch.nn.Module, views: list[str]):
        super().__init__()
        self.inner = inner
        self.views = list(views)

    @property
    def head(self) -> torch.nn.Module:
        return self.inner.head

    @property
    def blocks(self) -> list[torch.nn.Module]:
        return self.inner.blocks

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_and_embedding(x)[0]

    def logits_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, embedding = self.inner.logits_and_embedding(x)
        for view in self.views[1:]:
            logits = logits + self.inner.logits_and_embedding(apply_view(x, view, (2, 3)))[0]
        return logits / len(self.views), embedding
