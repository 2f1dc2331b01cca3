"""The models one serving worker holds (`ModelPool`), with hot reload. No HTTP here.

- `ModelPool.get("name")` gives the classifier `latest` pointed at when it was loaded;
  `get("name:version")` a pinned version (at most `max_loaded_models`, least recently used
  unloaded first). Models other than the preloaded ones load lazily on first use (once, however
  many requests ask at the same time).
- A poller checks `models.artifact.store.latest_version(name)` every `poll_seconds`; a new version is
  loaded off the event loop and swapped in with one assignment. A request keeps the classifier
  object it started with, so it finishes on that version and its response names it.
Nothing runs a model here: batching (service/batching.py), decoding, the decision and top-k belong
to the data plane (service/dataplane.py).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from models.artifact import store
from models.serving.runtime import OnnxClassifier, RuntimeOptions
from service.pool.devices import runtime_options, runtime_summary
from service.pool.metrics import metrics

log = logging.getLogger("tuneserve.service")


class ModelPool:
    """Loaded classifiers of one worker; see the module docstring."""

    def __init__(self, settings, options: RuntimeOptions | None = None):
        self.settings = settings
        self.options = options or runtime_options(settings)
        self._load = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self._latest: dict[str, OnnxClassifier] = {}
        self._pinned: OrderedDict[str, OnnxClassifier] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._failed: dict[str, tuple[str, float]] = {}  # name -> (version, when) of a failed reload
        self._poller: asyncio.Task | None = None
        self._preloader: asyncio.Task | None = None
        self.load_errors: dict[str, str] = {}
        metrics()

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start loading the configured models in the background, and the reload poller."""
        loop = asyncio.get_running_loop()
        self._preloader = loop.create_task(self._preload(), name="preload")
        self._poller = loop.create_task(self._poll(), name="reload-poller")

    async def stop(self) -> None:
        for task in (self._poller, self._preloader):
            if task is not None:
                task.cancel()
        self._load.shutdown(wait=False, cancel_futures=True)

    async def _preload(self) -> None:
        for name in self.settings.models_to_load:
            try:
                await self.get(name)
                self.load_errors.pop(name, None)
            except Exception as error:
                self.load_errors[name] = str(error)
                log.error("could not load model %s at startup: %s", name, error)

    def ready(self) -> bool:
        """Ready once the default model is loaded."""
        name, version = store.split_ref(self.settings.default_model)
        if version != "latest":
            tag = f"{name}:{version}"
            return any(c.tag == tag for c in [*self._pinned.values(), *self._latest.values()])
        current = self._latest.get(name)
        return current is not None and current.ready

    # ---- lookup and loading ----------------------------------------------------------------
    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def get(self, ref: str | None = None) -> OnnxClassifier:
        """The classifier for `name` (current latest) or `name:version`; loads it on first use."""
        ref = (ref or self.settings.default_model).strip()
        name, version = store.split_ref(ref)
        current = self._latest.get(name)
        if version == "latest":
            if current is not None:
                return current
            return await self._load_once(name, self._latest, name)
        if current is not None and current.version == version:
            return current
        tag = f"{name}:{version}"
        if tag in self._pinned:
            self._pinned.move_to_end(tag)
            return self._pinned[tag]
        classifier = await self._load_once(tag, self._pinned, tag)
        room = max(1, self.settings.max_loaded_models - len(self._latest))
        while len(self._pinned) > room:
            evicted, _ = self._pinned.popitem(last=False)  # oldest first; requests holding it still finish
            self._locks.pop(evicted, None)
            log.info("unloaded pinned model %s (max_loaded_models=%d)", evicted, self.settings.max_loaded_models)
        return classifier

    async def _load_once(self, ref: str, cache: dict, key: str) -> OnnxClassifier:
        """Resolve and load `ref` into `cache[key]` once, however many requests ask at once."""
        lock = self._lock(key)
        try:
            async with lock:
                if key in cache:
                    return cache[key]
                resolved = await asyncio.to_thread(store.resolve, ref)
                cache[key] = await self._load_version(resolved)
                return cache[key]
        finally:
            if key not in cache and not lock.locked():
                self._locks.pop(key, None)  # unknown refs must not pile up locks

    async def _load_version(self, version: store.ModelVersion) -> OnnxClassifier:
        def load() -> OnnxClassifier:
            return OnnxClassifier(version.path, version.name, version.version, self.options).load()

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._load, load)

    # ---- hot reload ------------------------------------------------------------------------
    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_seconds)
            try:
                await self.check_for_updates()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reload check failed")

    async def check_for_updates(self) -> list[str]:
        """Swap in every new `latest`; returns the tags swapped in."""
        swapped = []
        for name, current in list(self._latest.items()):
            latest = await asyncio.to_thread(store.latest_version, name)
            if not latest or latest == current.version:
                continue
            failed = self._failed.get(name)
            if failed and failed[0] == latest and time.monotonic() - failed[1] < 60:
                continue  # do not retry a broken version every poll
            classifier = await self._swap_in(name, latest, current)
            if classifier is not None:
                swapped.append(classifier.tag)
        return swapped

    async def _swap_in(self, name: str, latest: str, current: OnnxClassifier) -> OnnxClassifier | None:
        """Load `name:latest` and make it the one new requests get; None if it failed or was already in."""
        try:
            async with self._lock(name):
                if self._latest[name].version == latest:
                    return None  # a concurrent check (the poller or POST /models/{name}/reload) swapped it in
                resolved = await asyncio.to_thread(store.resolve, f"{name}:{latest}")
                classifier = await self._load_version(resolved)
                previous = self._latest.get(name)
                self._latest[name] = classifier  # the atomic swap; in-flight requests keep `previous`
        except Exception as error:
            self._failed[name] = (latest, time.monotonic())
            log.error("hot reload of %s:%s failed, still serving %s: %s", name, latest, current.tag, error)
            return None
        metrics()["reloads"].labels(name).inc()
        log.info("hot reload: %s now serves %s (was %s)", name, classifier.tag, previous.tag if previous else None)
        return classifier

    # ---- description -----------------------------------------------------------------------
    def loaded(self) -> dict[str, dict[str, Any]]:
        described = {}
        for classifier in [*self._latest.values(), *self._pinned.values()]:
            described[classifier.tag] = {**classifier.describe(), "follows_latest": self._latest.get(classifier.name) is classifier}
        return described

    def runtime(self) -> dict[str, Any]:
        return runtime_summary(self.options, self.load_errors)

