"""The job system's HTTP side: the kinds of job (registry.py: fine-tune, advise, quantize), one
router for all of them (router.py), submission (submit.py), dataset checks (datasets.py) and
uploaded archives (uploads.py, also used by /evaluate). The store, the runner and the backends
that run job children are in service/finetune/; the event and exit-code contract the children
write is models/jobs/events.py. Reference: docs/jobs.md."""
