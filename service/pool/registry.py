"""The models one serving worker holds (`ModelPool`), with hot reload. No HTTP here.

- `ModelPool.get("name")` gives the classifier `latest` pointed at when it was loaded;
  `get("name:version")` a pinned version (a canary or shadow candidate is one too). Models other
  than the preloaded ones load lazily on first use (once, however many requests ask at the same time).
- Every loaded version counts against one bound, `max_loaded_models`, whatever the traffic: followed
  `latest`s, pinned versions, canaries. One LRU order covers them all; room is made before a new
  session is created, so at most `max_loaded_models` sessions are held plus the one being loaded.
  The default model is never evicted (readiness depends on it), nor the version a request is loading.
  An evicted classifier stays valid for the requests that already hold it; its memory goes with them.
- A poller checks `models.artifact.store.latest_version(name)` every `poll_seconds` for the names it
  follows; a new version is loaded off the event loop and swapped in with one assignment. A request
  keeps the classifier object it started with, so it finishes on that version and its response names it.
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
from service.pool.devices import runtime_options, runtime_summary, worker_index
from service.pool.metrics import metrics, observe_load, set_loaded

log = logging.getLogger("tuneserve.service")


class ModelPool:
    """Loaded classifiers of one worker; see the module docstring."""

    def __init__(self, settings, options: RuntimeOptions | None = None):
        self.settings = settings
        self.options = options or runtime_options(settings)
        self._load = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self._latest: dict[str, OnnxClassifier] = {}  # name -> the version it follows
        self._pinned: dict[str, OnnxClassifier] = {}  # name:version -> that version
        self._recent: OrderedDict[str, None] = OrderedDict()  # keys of both, least recently used first
        self._locks: dict[str, asyncio.Lock] = {}
        self._failed: dict[str, tuple[str, float]] = {}  # name -> (version, when) of a failed reload
        self._poller: asyncio.Task | None = None
        self._preloader: asyncio.Task | None = None
        self.load_errors: dict[str, str] = {}
        self.counts = {"loads": 0, "evictions": 0, "peak_loaded": 0}  # since this worker started
        metrics()

    @property
    def bound(self) -> int:
        return self.settings.max_loaded_models

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
        names = self.settings.models_to_load
        if len(names) > self.bound:
            log.warning("%d models to preload but max_loaded_models=%d: the least recently used are unloaded again",
                        len(names), self.bound)
        for name in names:
            try:
                await self.get(name, reason="preload")
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

    async def get(self, ref: str | None = None, reason: str = "request") -> OnnxClassifier:
        """The classifier for `name` (current latest) or `name:version`; loads it on first use."""
        ref = (ref or self.settings.default_model).strip()
        name, version = store.split_ref(ref)
        current = self._latest.get(name)
        if version == "latest":
            if current is not None:
                return self._touch(name, current)
            return await self._load_once(name, self._latest, name, reason)
        if current is not None and current.version == version:
            return self._touch(name, current)
        tag = f"{name}:{version}"
        if tag in self._pinned:
            return self._touch(tag, self._pinned[tag])
        return await self._load_once(tag, self._pinned, tag, reason)

    def _touch(self, key: str, classifier: OnnxClassifier) -> OnnxClassifier:
        self._recent.move_to_end(key)
        return classifier

    async def _load_once(self, ref: str, cache: dict, key: str, reason: str) -> OnnxClassifier:
        """Resolve and load `ref` into `cache[key]` once, however many requests ask at once."""
        lock = self._lock(key)
        try:
            async with lock:
                if key in cache:
                    return self._touch(key, cache[key])
                resolved = await asyncio.to_thread(store.resolve, ref)
                classifier = self._adopt_pinned(resolved) if cache is self._latest else None
                if classifier is None:
                    self._evict(self.bound - 1, spare=key)  # room first: never bound + 1 sessions held
                    classifier = await self._load_version(resolved, reason)
                self._admit(cache, key, classifier)
                return classifier
        finally:
            if key not in cache and not lock.locked():
                self._locks.pop(key, None)  # unknown refs must not pile up locks

    def _adopt_pinned(self, resolved: store.ModelVersion) -> OnnxClassifier | None:
        """The pinned classifier of the version `latest` names, moved to follow `latest` (no second session)."""
        classifier = self._pinned.pop(resolved.tag, None)
        if classifier is not None:
            self._recent.pop(resolved.tag, None)
        return classifier

    def _admit(self, cache: dict, key: str, classifier: OnnxClassifier) -> None:
        cache[key] = classifier
        self._recent[key] = None
        self._recent.move_to_end(key)
        self._evict(self.bound, spare=key)  # loads that finished meanwhile may have filled the room
        self.counts["peak_loaded"] = max(self.counts["peak_loaded"], len(self._recent))
        set_loaded(len(self._recent))

    def _protected(self) -> str:
        """The key of the default model: never evicted, readiness depends on it."""
        name, version = store.split_ref(self.settings.default_model)
        return name if version == "latest" else f"{name}:{version}"

    def _evict(self, keep: int, spare: str) -> list[str]:
        """Unload least recently used versions until at most `keep` are held; returns their keys."""
        protected, evicted = {self._protected(), spare}, []
        for key in list(self._recent):
            if len(self._recent) <= max(keep, 0):
                break
            if key in protected:
                continue
            self._recent.pop(key)
            classifier = self._latest.pop(key, None) or self._pinned.pop(key, None)
            lock = self._locks.get(key)
            if lock is not None and not lock.locked():
                self._locks.pop(key, None)
            evicted.append(key)
            log.info("unloaded %s, least recently used (max_loaded_models=%d)", classifier.tag if classifier else key, self.bound)
        if evicted:
            self.counts["evictions"] += len(evicted)
            metrics()["evictions"].inc(len(evicted))
            set_loaded(len(self._recent))
        return evicted

    async def _load_version(self, version: store.ModelVersion, reason: str) -> OnnxClassifier:
        def load() -> OnnxClassifier:
            started = time.perf_counter()
            classifier = OnnxClassifier(version.path, version.name, version.version, self.options).load()
            observe_load(reason, time.perf_counter() - started)
            return classifier

        loop = asyncio.get_running_loop()
        classifier = await loop.run_in_executor(self._load, load)
        self.counts["loads"] += 1
        return classifier

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
        """Load `name:latest` and make it the one new requests get; None if it failed, was already in,
        or `name` was unloaded meanwhile (its next request loads the new latest anyway)."""
        try:
            async with self._lock(name):
                if name not in self._latest or self._latest[name].version == latest:
                    return None  # a concurrent check (the poller or POST /models/{name}/reload) swapped it in
                resolved = await asyncio.to_thread(store.resolve, f"{name}:{latest}")
                classifier = await self._load_version(resolved, "reload")
                previous = self._latest.get(name)
                if previous is None:
                    return None  # evicted while loading: keep the bound
                self._latest[name] = classifier  # the atomic swap; in-flight requests keep `previous`
        except Exception as error:
            self._failed[name] = (latest, time.monotonic())
            log.error("hot reload of %s:%s failed, still serving %s: %s", name, latest, current.tag, error)
            return None
        metrics()["reloads"].labels(name).inc()
        log.info("hot reload: %s now serves %s (was %s)", name, classifier.tag, previous.tag)
        return classifier

    # ---- description -----------------------------------------------------------------------
    def loaded(self) -> dict[str, dict[str, Any]]:
        described = {}
        for classifier in [*self._latest.values(), *self._pinned.values()]:
            described[classifier.tag] = {**classifier.describe(), "follows_latest": self._latest.get(classifier.name) is classifier}
        return described

    def readiness(self) -> dict[str, Any]:
        """What this worker holds, from memory only (GET /readyz/models): cheap enough for a balancer."""
        def entry(key: str) -> dict[str, Any]:
            classifier = self._latest.get(key) or self._pinned[key]
            return {"model": classifier.name, "version": classifier.version, "variant": classifier.variant,
                    "follows_latest": key in self._latest}

        return {
            "ready": self.ready(),
            "default_model": self.settings.default_model,
            "worker": worker_index(),
            "loaded": [entry(key) for key in reversed(self._recent)],  # most recently used first
            "max_loaded_models": self.bound,
            **self.counts,
            "load_errors": dict(self.load_errors),
        }

    def runtime(self) -> dict[str, Any]:
        return runtime_summary(self.options, self.load_errors)
