"""Every job kind the server runs, by name (the URL prefix and the store's `kind`)."""
from __future__ import annotations

from service.jobs import advise, finetune, quantize
from service.jobs.kinds import JobKind

KINDS: dict[str, JobKind] = {kind.name: kind for kind in (finetune.KIND, advise.KIND, quantize.KIND)}


def kind_named(name: str) -> JobKind:
    return KINDS[name]
