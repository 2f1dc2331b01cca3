"""The job runtime for every kind of job: the SQLite store, quotas, the backends that run a job
child (local process or Ray) and the runner that supervises it. No torch here; the HTTP side is
service/jobs/ (docs/jobs.md)."""
from service.finetune.runner import JobManager

__all__ = ["JobManager"]
