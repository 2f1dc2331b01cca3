"""Typed requests and answers of the loop's HTTP routes (service/routes/loop.py)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.names import CALLER_ID


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class FeedbackIn(BaseModel):
    request_id: str = Field(min_length=1, max_length=200, pattern=CALLER_ID.pattern,
                            description="The `request_id` of a classification result")
    label: str = Field(min_length=1, max_length=200, description="The true label of that image")


class FeedbackOut(_Open):
    request_id: str
    model: str
    version: str | None
    predicted: str | None
    label: str
    correct: bool | None = Field(description="Whether the served answer was right (null when it abstained)")
    captured: bool = Field(description="Whether the image is kept, so the label can train a later version")


class RolloutIn(BaseModel):
    version: str = Field(min_length=1, description="The candidate version (must be published)")
    mode: Literal["canary", "shadow"] = "canary"
    percent: float = Field(10.0, ge=0, le=100, description="Canary only: share of un-pinned traffic the candidate answers")


class ExpectIn(BaseModel):
    expected: str | None = Field(None, min_length=1, max_length=200, description=(
        "Compare-and-set: the version this call means to act on (promote: the candidate; rollback: the "
        "candidate, or with none the serving version); another one there answers 409 naming it. "
        "Absent: act on whatever is there"))


class RolloutOut(_Open):
    model: str
    stable: str
    candidate: str | None
    mode: str | None
    percent: float
    updated: float
    updated_by: str | None
    rolled_back: str | None = Field(None, description="Rollback only: the version traffic left (still stored)")
    returned_to: str | None = Field(None, description="Rollback only: the version un-pinned traffic returned to")


class CaptureSwitch(BaseModel):
    enabled: bool
    fraction: float | None = Field(None, ge=0, le=1, description="Share of confident, in-domain requests kept "
                                   "(abstained and out-of-domain ones are always kept); null: the server's setting")


class ReviewItem(_Open):
    capture_id: str = Field(description="Also the request_id: POST /feedback with it and the true label")
    version: str
    label: str | None = Field(description="What the version answered")
    confidence: float
    margin: float | None
    in_domain: float | None
    abstained: bool
    reason: str = Field(description="Why it was captured: abstained, out_of_domain, sampled or feedback")
    uncertainty: float = Field(description="1 - margin + 1 - in_domain: the queue's order (near-duplicates spread out)")
    image_url: str


class ReviewQueue(_Open):
    model: str
    items: list[ReviewItem]
    waiting: int = Field(description="Captured images not yet labelled or skipped")


class Monitor(_Open):
    model: str
    serving: dict[str, Any] = Field(description="latest in the store, and the rollout (stable, candidate) if any")
    versions: dict[str, Any] = Field(description="Per version: eval.json accuracy, live accuracy with its count and "
                                     "95 % Wilson interval, the newest drift window and the drift history")
    shadow: dict[str, Any] | None = None
    captures: dict[str, Any]
    events: list[dict[str, Any]]
