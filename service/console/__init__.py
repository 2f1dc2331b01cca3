"""The web console: static files served at `/` by the same app as the API.

No build step and no CDN (the machines it runs on may be offline): plain HTML, JS and SVG under
`static/`. The page only calls the public HTTP API, with the API key a user typed (kept in the
tab's sessionStorage), so it can do nothing a client could not.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from models.jobs.train_config import BACKBONE_NAMES, STRATEGIES

STATIC = Path(__file__).parent / "static"


class Registry(BaseModel):
    """What a fine-tune `source` and `strategy` may name (stored models are listed by /models)."""

    backbones: list[str]
    strategies: list[str]


def mount_console(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def console_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/backbones", tags=["models"], response_model=Registry)
    async def backbones() -> Registry:
        """Backbones and strategies a fine-tune job accepts."""
        return Registry(backbones=list(BACKBONE_NAMES), strategies=list(STRATEGIES))

    app.mount("/console", StaticFiles(directory=STATIC), name="console")
