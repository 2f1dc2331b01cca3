"""POST /models/{name}/finetune_from_feedback: a fine-tune job whose source is the served version
and whose data is its labelled feedback (plus, when asked, the version's training data); the job
is an ordinary fine-tune (GET /finetune/{job_id} follows it). Every store read, file and SQLite
call runs in a worker thread, never on the event loop."""
import asyncio
import json
import shutil
import time
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from models.artifact import store
from service.finetune import quotas
from service.jobs.datasets import check_dataset
from service.jobs.registry import kind_named
from service.loop import retrain
from service.loop import rollout as rollouts
from service.loop.plane import LoopPlane
from service.routes.forms import ModelPath, errors


class RetrainIn(BaseModel):
    version: str | None = Field(None, description="The version to start from; default: the stable (or latest) one")
    with_training_data: bool = Field(True, description="Add the version's training data to the feedback (refused "
                                     "when it is no longer on this machine); false: the feedback alone")
    name: str | None = Field(None, description="The model to publish into; default: the same model")
    config: dict[str, Any] = Field({}, description="More fine-tune config fields (epochs, strategy, …)")


def add_retrain_route(router: APIRouter, loop_of, key) -> None:
    @router.post("/models/{name}/finetune_from_feedback", status_code=202,
                 responses=errors(400, 401, 404, 409, 422, 429, 507))
    async def finetune_from_feedback(name: ModelPath, body: RetrainIn, request: Request,
                                     loop: LoopPlane = Depends(loop_of), by: str = Depends(key)) -> JSONResponse:
        """Queue a fine-tune of the served version on its labelled feedback."""
        manager = getattr(request.app.state, "jobs", None)
        if manager is None:
            raise HTTPException(501, "fine-tune jobs are not available on this server")
        model, _ = store.split_ref(name)
        version = body.version or await asyncio.to_thread(_serving, loop, model)
        job, kind, config, info, summary = await asyncio.to_thread(submit_retrain, manager, loop, model, version, body, by)
        manager.wake()
        await asyncio.to_thread(_record, loop, model, info, job.id, by)
        body_out = {"job_id": job.id, "kind": kind.name, "state": job.state, "dataset": summary, "config": config, **info}
        return JSONResponse(body_out, status_code=202, headers={"Location": f"/{kind.name}/{job.id}"})


def submit_retrain(manager: Any, loop: LoopPlane, model: str, version: str, body: RetrainIn, by: str) -> tuple:
    """Validate, build the dataset, check it and store the job, in one worker thread (store reads,
    file links, SQLite writes: none of it on the event loop); a failure removes the job folder.
    → (job, kind, config, what the dataset holds, the dataset summary)."""
    from service.finetune.store import new_job_id

    kind = kind_named("finetune")
    config = kind.validate({"name": body.name or model, "source": f"{model}:{version}", **body.config})
    job_id = new_job_id(kind.id_prefix)
    job_dir = manager.settings.jobs_dir / job_id
    try:
        quotas.check_disk(manager.settings, 0)  # the disk budget and floor, as POST /finetune checks them
        info = retrain.prepare(loop.db, model, version, job_dir / "dataset", body.with_training_data)
        quotas.check_disk(manager.settings, 0)  # again, with the new job folder counted (removed if over)
        min_per_class = max(manager.settings.finetune_min_per_class, int(config.get("min_images_per_class") or 2))
        summary = check_dataset(job_dir / "dataset", manager.settings, min_per_class, config)
        job = manager.store.create(config, job_dir / "dataset", job_dir, job_id, submitted_by=by,
                                   quota=manager.settings, kind=kind.name)
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    return job, kind, config, info, summary


def _serving(loop: LoopPlane, model: str) -> str:
    state = rollouts.current(loop.db, model)
    version = state.stable if state else store.latest_version(model)
    if version is None:
        raise store.ModelNotFound(f"unknown model {model!r}")
    return version


def _record(loop: LoopPlane, model: str, info: dict, job_id: str, by: str) -> None:
    with loop.db.write() as conn:
        conn.execute("INSERT INTO events (model, action, version, detail, by, at) VALUES (?,?,?,?,?,?)",
                     (model, "finetune_from_feedback", info["source"].split(":", 1)[1],
                      json.dumps({"job_id": job_id, "feedback": info["feedback"], "training_images": info["training_images"]}),
                      by, time.time()))
