"""Durable fine-tune jobs: SQLite store, child-process runner, REST routes. No torch here."""
from service.finetune.runner import JobManager


def build_router(manager, settings=None):
    from service.finetune.api import build_router as _build

    return _build(manager, settings)


__all__ = ["JobManager", "build_router"]
