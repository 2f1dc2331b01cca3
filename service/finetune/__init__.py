"""Durable fine-tune jobs: SQLite store, child-process runner. No torch here; the HTTP routes are
in service/routes/finetune.py."""
from service.finetune.runner import JobManager

__all__ = ["JobManager"]
