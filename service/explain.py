"""`explain` on /classify and /classify_batch: one class's evidence map (the graph's `evidence` output,
fetched only when asked) as the `Evidence` answer: a small normalised grid with its scale and, on
request, an overlay PNG. The maths is models/serving/evidence.py's; this module only picks the class."""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Form

from models.errors import TuneserveError
from models.serving.evidence import GRID_SIDE, overlay_png, summarise
from models.serving.runtime import OnnxClassifier
from service.schemas import Error, Evidence, Prediction

OVERLAY_SIDE = 224  # overlays of smaller crops are enlarged to this (nearest neighbour)
OUTPUTS = frozenset({"evidence", "logits"})  # logits: the answer gives the class's logit and bias


Explain = Annotated[bool, Form(description="Also answer where in the image the evidence is (`evidence`: a "
                                          f"{GRID_SIDE}×{GRID_SIDE} grid); 409 for a version without evidence maps")]
ExplainLabel = Annotated[str | None, Form(max_length=256, description="The class to explain (implies `explain`); "
                                          "default: the most probable label")]
ExplainOverlay = Annotated[bool, Form(description="Also draw the grid on the image: `evidence.overlay_png` (implies `explain`)")]


def explain_form(explain: Explain = False, explain_label: ExplainLabel = None,
                 explain_overlay: ExplainOverlay = False) -> tuple[bool, str | None, bool]:
    """The three explain form fields, as one dependency a route declares once."""
    return explain, explain_label, explain_overlay


ExplainForm = Annotated[tuple[bool, str | None, bool], Depends(explain_form)]


EXPLAIN_ERRORS = {409: {"model": Error, "description": "`explain` asked of a version without evidence maps (the error says why)"}}


class UnknownLabel(TuneserveError):
    status = 422


@dataclass(frozen=True)
class ExplainAsk:
    """What a caller asked: nothing (`asked` False), or a class (None: the most probable) and an overlay."""

    asked: bool = False
    label: str | None = None
    overlay: bool = False

    def outputs(self) -> frozenset[str]:
        return OUTPUTS if self.asked else frozenset()


def explain_ask(classifier: OnnxClassifier, form: tuple[bool, str | None, bool]) -> ExplainAsk:
    """The checked ask: a label or an overlay implies explain; refused before any inference when the
    version has no evidence maps (409) or the label is not one of its labels (422)."""
    explain, label, overlay = form
    ask = ExplainAsk(bool(explain or label or overlay), label or None, bool(overlay))
    if ask.asked:
        classifier.require_evidence()
        if ask.label is not None and ask.label not in classifier.manifest.labels:
            raise UnknownLabel(f"explain_label {ask.label!r} is not a label of model {classifier.tag}")
    return ask


def evidence_answer(classifier: OnnxClassifier, image, ask: ExplainAsk) -> Evidence:
    """`image` (a dataplane ImageResult with evidence, logits, ranked and pixels) → the Evidence answer."""
    labels = classifier.manifest.labels
    index = labels.index(ask.label) if ask.label is not None else int(image.ranked[0])
    summary = summarise(image.evidence[index], GRID_SIDE)
    logit = float(image.logits[index])
    png = overlay_png(image.pixels, summary.grid, OVERLAY_SIDE) if ask.overlay else None
    return Evidence(label=labels[index], logit=logit, bias=logit - summary.total, scale=summary.scale,
                    grid=summary.grid.round(4).tolist(), overlay_png=base64.b64encode(png).decode() if png else None)


def with_evidence(classifier: OnnxClassifier, image, ask: ExplainAsk) -> Prediction:
    """The image's prediction, with its `evidence` when asked."""
    if not ask.asked:
        return image.prediction
    return image.prediction.model_copy(update={"evidence": evidence_answer(classifier, image, ask)})
