"""GET /models, GET /models/{name}, POST /models/{name}/reload, GET /readyz/models."""
import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from models.artifact import store
from models.errors import TuneserveError
from service.auth import require_api_key, require_read_access
from service.config import Settings
from service.pool import ModelPool
from service.routes.forms import ModelPath, errors, pool_of
from service.schemas import ModelDetail, ModelList, Readiness, Reloaded

Pool = Annotated[ModelPool, Depends(pool_of)]


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["models"])
    read = [Depends(require_read_access(settings))]
    write = [Depends(require_api_key(settings))]

    @router.get("/models", dependencies=read, response_model=ModelList, responses=errors(401, 503))
    async def list_models(pool: Pool) -> dict[str, Any]:
        """Every stored model with its versions, and what this worker has loaded."""
        return {
            "default_model": settings.default_model,
            "models": await asyncio.to_thread(_stored_models),
            "loaded": pool.loaded(),
            "runtime": pool.runtime(),
        }

    @router.get("/models/{name}", dependencies=read, response_model=ModelDetail, responses=errors(401, 404, 422, 503))
    async def show_model(name: ModelPath, pool: Pool) -> dict[str, Any]:
        """One model's versions (`name`) or one version (`name:version`), with manifests and eval reports."""
        model_name, version = store.split_ref(name)
        found = await asyncio.to_thread(_stored_model, model_name, version)
        found["loaded"] = {tag: d for tag, d in pool.loaded().items() if tag.split(":")[0] == model_name}
        return found

    @router.post("/models/{name}/reload", dependencies=write, response_model=Reloaded, responses=errors(401, 404, 422, 503))
    async def reload_model(name: ModelPath, pool: Pool) -> dict[str, Any]:
        """Check the store now instead of waiting for the poller (this worker); loads the model if needed."""
        model_name, _ = store.split_ref(name)
        await pool.get(model_name)
        swapped = await pool.check_for_updates()
        current = await pool.get(model_name)
        return {"model": model_name, "version": current.version, "variant": current.variant, "swapped": swapped}

    not_ready = {503: {"model": Readiness, "description": "Not ready yet: the default model is not loaded"}}

    @router.get("/readyz/models", dependencies=read, response_model=Readiness, responses={**errors(401), **not_ready})
    async def readiness(pool: Pool) -> JSONResponse:
        """/readyz with a body: whether this worker is ready and what it holds, from memory (no store
        read). 503 with the same body until the default model is loaded. BentoML answers /readyz itself,
        as plain text."""
        state = pool.readiness()
        return JSONResponse(Readiness(**state).model_dump(), status_code=200 if state["ready"] else 503)

    return router


def _stored_models() -> dict[str, Any]:
    out = {}
    for name, versions in store.list_models().items():
        entries = []
        for version in versions:
            try:
                entries.append(store.describe(version))
            except TuneserveError as error:
                entries.append({"version": version.version, "error": str(error)})
        out[name] = {"latest": store.latest_version(name), "versions": entries}
    return out


def _stored_model(model_name: str, version: str) -> dict[str, Any]:
    known = store.list_models()
    if model_name not in known:
        raise store.ModelNotFound(f"unknown model {model_name!r}; known models: {sorted(known) or 'none'}")
    versions = known[model_name]
    if version != "latest":
        versions = [store.resolve(f"{model_name}:{version}")]
    return {
        "name": model_name,
        "latest": store.latest_version(model_name),
        "versions": [store.describe(v, full=True) for v in versions],
    }
