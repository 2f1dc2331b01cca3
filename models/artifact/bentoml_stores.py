"""The one place tuneserve reaches into BentoML's internals, and why.

BentoML 1.4's public model API (`bentoml.models.list/get/create/delete`) works on a store passed as
`_model_store=`, but it has no public way to name the folder of the store it uses, or to open a
second store: a served bento's baked models and `$BENTOML_HOME/models` are two stores, and
tuneserve reads both. These three functions are that missing surface; `tests/test_structure.py`
checks that no other module imports `bentoml._internal`, so a BentoML upgrade has one file to read.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


def _container():
    from bentoml._internal.configuration.containers import BentoMLContainer

    return BentoMLContainer


def configured_store_dir() -> Path:
    """`$BENTOML_HOME/models`: BentoML keeps this path even when it serves a bento's baked models."""
    return Path(_container().model_store_dir.get()).resolve()


def active_store_dir() -> Path:
    """The folder of the store BentoML's own calls use now: `<bento>/models` when it serves a bento
    that carries models (bentoml/_internal/service/loader.py points it there), else the configured one."""
    return Path(_container().model_store.get()._path).resolve()


@functools.lru_cache(maxsize=8)
def _store_at(path: str) -> Any:
    from bentoml._internal.models import ModelStore

    return ModelStore(path)


def model_store(path: Path) -> Any:
    """The store for `_model_store=` at `path`: BentoML's own instance when it is that folder (tests and
    `bentoml models` point it elsewhere), else one opened once per folder."""
    current = _container().model_store.get()
    if Path(current._path).resolve() == path:
        return current
    return _store_at(str(path))
