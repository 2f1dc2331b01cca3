"""The production loop's HTTP area: POST /feedback; GET /models/{name}/review and /monitor;
POST /models/{name}/capture, /rollout, /promote, /rollback; the captured images for review.

Reading routes follow TUNESERVE_PROTECT_READS; every route that changes state needs a key, and the
key's name is recorded as who did it. The work is service/loop's; this module only translates.
"""
import asyncio
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path as PathParam, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError

from models.artifact import store
from models.errors import ModelNotFound
from service.auth import require_api_key, require_read_access
from service.config import Settings
from service.loop import records, review
from service.loop import rollout as rollouts
from service.loop.capture import Captured
from service.loop.monitor import monitor
from service.loop.plane import LoopPlane, loop_for
from service.loop.schemas import (
    CaptureSwitch, ExpectIn, FeedbackIn, FeedbackOut, Monitor, ReviewQueue, RolloutIn, RolloutOut,
)
from service.names import CALLER_ID, new_request_id
from service.routes.forms import ModelPath, errors
from service.routes.loop_retrain import add_retrain_route

# a capture id is a request id the server made (older records: a caller's checked id); nothing else is looked up
CaptureId = Annotated[str, PathParam(pattern=CALLER_ID.pattern, description="A captured image's id (its request id)")]

FEEDBACK_FORM = {"type": "object", "additionalProperties": False, "required": ["label"], "properties": {
    "request_id": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": CALLER_ID.pattern,
                   "description": "The request_id of a classification result"},
    "label": {"type": "string", "minLength": 1, "description": "The true label"},
}}
FEEDBACK_BODY = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": FeedbackIn.model_json_schema()},
        "application/x-www-form-urlencoded": {"schema": FEEDBACK_FORM},
    }},
    "description": "JSON or a form with `request_id` and `label`; or a multipart form with `image` (the image "
                   "itself), `label` and optionally `model`, to label an image that was never served.",
}


def loop_of(request: Request) -> LoopPlane:
    return loop_for(request.app.state.settings)


Loop = Annotated[LoopPlane, Depends(loop_of)]


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["loop"])
    read = [Depends(require_read_access(settings))]
    key = require_api_key(settings)

    @router.post("/feedback", response_model=FeedbackOut, responses=errors(400, 401, 404, 409, 413, 415, 422),
                 openapi_extra=FEEDBACK_BODY)
    async def feedback(request: Request, loop: Loop, by: str = Depends(key)) -> dict[str, Any]:
        """The true label of a served request (`request_id`), or of an uploaded `image`; JSON or a form."""
        fields, image = await _feedback_fields(request)
        if image is not None:
            return await _image_feedback(request, loop, fields, image, by)
        try:
            body = FeedbackIn(**fields)
        except ValidationError as error:
            raise records.BadFeedback(_explain(error)) from None
        return await _feedback_on_answer(loop, body.request_id, body.label.strip(), by)

    @router.get("/models/{name}/review", dependencies=read, response_model=ReviewQueue, responses=errors(401, 404, 422))
    async def review_queue(name: ModelPath, loop: Loop, limit: Annotated[int, Query(ge=1, le=500)] = 20) -> dict:
        """Captured, unlabelled images, most informative first (see service/loop/review.py)."""
        model = await asyncio.to_thread(_known, name)
        found = await asyncio.to_thread(review.candidates, loop.db, model)
        ranked = await asyncio.to_thread(review.rank, found, limit)
        items = [{**_candidate(c), "uncertainty": score, "image_url": f"/models/{model}/captures/{c.capture_id}"}
                 for c, score in ranked]
        return {"model": model, "items": items, "waiting": len(found)}

    @router.get("/models/{name}/captures/{capture_id}", dependencies=read, responses=errors(401, 404, 422),
                response_class=Response)
    async def captured_image(name: ModelPath, capture_id: CaptureId, loop: Loop) -> Response:
        """The bytes of one captured image, as uploaded."""
        data = await asyncio.to_thread(loop.captures.image, name, capture_id)
        if data is None:
            raise ModelNotFound(f"no captured image {capture_id!r} of model {name!r} (never captured, or aged out)")
        return Response(data, media_type="application/octet-stream")

    @router.post("/models/{name}/review/{capture_id}/skip", responses=errors(401, 404, 422))
    async def skip(name: ModelPath, capture_id: CaptureId, loop: Loop, by: str = Depends(key)) -> dict:
        """Take an image out of the review queue without a label."""
        if not await asyncio.to_thread(review.skip, loop.db, name, capture_id):
            raise ModelNotFound(f"no captured image {capture_id!r} of model {name!r}")
        return {"model": name, "capture_id": capture_id, "skipped": True, "by": by}

    @router.post("/models/{name}/capture", responses=errors(400, 401, 404, 422))
    async def capture_switch(name: ModelPath, switch: CaptureSwitch, loop: Loop, by: str = Depends(key)) -> dict:
        """Turn capture of this model's requests on or off (every worker within a second)."""
        model = await asyncio.to_thread(_known, name)
        return await asyncio.to_thread(loop.set_capture, model, switch.enabled, switch.fraction, by)

    _rollout_routes(router, read, key)
    add_retrain_route(router, loop_of, key)
    return router


def _rollout_routes(router: APIRouter, read: list, key) -> None:
    @router.get("/models/{name}/monitor", dependencies=read, response_model=Monitor, responses=errors(401, 404, 422))
    async def model_monitor(name: ModelPath, loop: Loop) -> dict:
        """Per version: eval.json vs live accuracy, drift, rates; the rollout, shadow agreement, captures."""
        return await asyncio.to_thread(lambda: monitor(loop, _known(name)))

    @router.post("/models/{name}/rollout", response_model=RolloutOut, responses=errors(400, 401, 404, 409, 422))
    async def start_rollout(name: ModelPath, body: RolloutIn, loop: Loop, by: str = Depends(key)) -> dict:
        """Make `version` a canary (`percent` of un-pinned traffic) or a shadow of the stable version."""
        model = await asyncio.to_thread(_known, name)
        await asyncio.to_thread(store.resolve, f"{model}:{body.version}")  # 404 naming it when unknown
        serving = await asyncio.to_thread(_serving_before, model, body.version)
        state = await asyncio.to_thread(rollouts.start, loop.db, model, body.version, body.mode, body.percent,
                                        serving, by)
        await asyncio.to_thread(loop.refresh)
        return state.public()

    @router.post("/models/{name}/promote", response_model=RolloutOut, responses=errors(400, 401, 404, 409, 422))
    async def promote(name: ModelPath, loop: Loop, body: ExpectIn | None = None, by: str = Depends(key)) -> dict:
        """The candidate becomes stable: all un-pinned traffic, on every worker within a second. With
        `expected`, only if that is still the candidate (else 409 naming the actual one)."""
        model = await asyncio.to_thread(_known, name)
        expected = body.expected if body else None
        state = await asyncio.to_thread(rollouts.promote, loop.db, model, by, "", expected)
        await asyncio.to_thread(loop.refresh)
        return state.public()

    @router.post("/models/{name}/rollback", response_model=RolloutOut, responses=errors(400, 401, 404, 409, 422))
    async def rollback(name: ModelPath, loop: Loop, body: ExpectIn | None = None, by: str = Depends(key)) -> dict:
        """Drop the candidate; without one, return to the version before the serving one (the stable
        one before its promotion, else the one published before it; every version stays stored).
        With `expected`, only if that is the version being rolled back (else 409 naming it)."""
        model = await asyncio.to_thread(_known, name)
        versions = await asyncio.to_thread(_versions, model)
        state, rolled = await asyncio.to_thread(rollouts.rollback, loop.db, model, by, versions,
                                                body.expected if body else None)
        await asyncio.to_thread(loop.refresh)
        return {**state.public(), "rolled_back": rolled, "returned_to": state.stable}


def _known(ref: str) -> str:
    name, _ = store.split_ref(ref)
    if store.latest_version(name) is None:
        raise ModelNotFound(f"unknown model {name!r}")
    return name


def _versions(model: str) -> list[str]:
    """The model's versions, `latest` first, then the others newest first."""
    latest = store.latest_version(model)
    names = [v.version for v in store.list_models().get(model, [])]
    return [v for v in dict.fromkeys([latest, *names]) if v]


async def _feedback_on_answer(loop: LoopPlane, request_id: str, label: str, by: str) -> dict:
    """Feedback by request id, also right after the answer: a record not in the database yet is
    either queued in this worker (flushed now) or about to be written by the worker that answered
    (the database is re-read for a bounded `feedback_wait_s`, a little over its flush interval)."""
    deadline = time.monotonic() + loop.settings.feedback_wait_s
    flushed = False
    while True:
        try:
            return await asyncio.to_thread(_record, loop, request_id, label, by)
        except records.UnknownRequest:
            if time.monotonic() >= deadline:
                raise
        if not flushed:
            flushed = True
            await loop.flush()
        else:
            await asyncio.sleep(0.05)


def _serving_before(model: str, candidate: str) -> str | None:
    """The version un-pinned traffic had before `candidate`: `latest`, or, when the candidate was just
    published and is `latest` itself, the newest version before it (so publish, then roll out)."""
    latest = store.latest_version(model)
    if latest != candidate:
        return latest
    names = [v.version for v in store.list_models().get(model, [])]  # newest first
    index = names.index(candidate) if candidate in names else len(names)
    return names[index + 1] if index + 1 < len(names) else latest


def _explain(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors())


async def _feedback_fields(request: Request) -> tuple[dict[str, Any], bytes | None]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            body = json.loads(await request.body())
        except ValueError as error:
            raise records.BadFeedback(f"the body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise records.BadFeedback("the JSON body must be an object with request_id and label")
        return body, None
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_files=1, max_fields=10)
        image = form.get("image")
        data = await image.read() if image is not None and not isinstance(image, str) else None
        return {k: v for k, v in form.items() if isinstance(v, str) and v != ""}, data
    from fastapi import HTTPException

    raise HTTPException(415, f"send JSON or a form (multipart or urlencoded), not {kind or 'no content type'}")


def _record(loop: LoopPlane, request_id: str, label: str, by: str) -> dict:
    capture_rows = loop.db.read("SELECT model, version, label FROM captures WHERE capture_id = ?", (request_id,))
    found = records.prediction(loop.db, request_id) or (dict(capture_rows[0]) if capture_rows else None)
    if found is None:
        raise records.UnknownRequest(f"no prediction with request_id {request_id!r} (unknown, or older than the kept records)")
    labels = _labels(found["model"], found["version"])
    row = records.record_feedback(loop.db, request_id, label, labels, by, found["model"], found["version"],
                                  found["label"], request_id if capture_rows else None)
    return {**row, "captured": bool(capture_rows)}


def _labels(model: str, version: str) -> list[str] | None:
    try:
        return list(store.resolve(f"{model}:{version}").manifest().labels)
    except Exception:  # a deleted version: any label is accepted
        return None


async def _image_feedback(request: Request, loop: LoopPlane, fields: dict, image: bytes, by: str) -> dict:
    from service.dataplane import InferenceRequest
    from service.routes.forms import plane_of

    label = (fields.get("label") or "").strip()
    if not label:
        raise records.BadFeedback("missing 'label': the true label of the image")
    plane = await plane_of(request)
    classifier = await plane.resolve(fields.get("model"))
    if label not in classifier.manifest.labels:
        raise records.BadFeedback(f"label {label!r} is not one of {classifier.name}'s labels: "
                                  f"{', '.join(classifier.manifest.labels)}")
    answer = (await plane.infer(InferenceRequest(model=classifier, images=[image], top_k=1))).images[0]
    if answer.error is not None:
        raise answer.error
    prediction = answer.prediction
    request_id = prediction.request_id or new_request_id()
    item = Captured(request_id, classifier.name, classifier.version, image, prediction.label, prediction.probability,
                    None, None, prediction.in_domain, prediction.abstained, "feedback")
    stored = await asyncio.to_thread(loop.captures.write, [item])
    row = await asyncio.to_thread(records.record_feedback, loop.db, request_id, label, None, by, classifier.name,
                                  classifier.version, prediction.label, request_id if stored else None)
    return {**row, "captured": bool(stored)}


def _candidate(c: review.Candidate) -> dict:
    return {"capture_id": c.capture_id, "version": c.version, "label": c.label, "confidence": c.confidence,
            "margin": c.margin, "in_domain": c.in_domain, "abstained": c.abstained, "reason": c.reason}
