"""The models one serving worker holds, with hot reload and per-model micro-batching. No HTTP here.

- `ModelPool.get("name")` gives the classifier `latest` pointed at when it was loaded;
  `get("name:version")` a pinned version. Models other than the preloaded ones load lazily on
  first use (once, however many requests ask at the same time).
- A poller checks `models.store.latest_version(name)` every `poll_seconds`; a new version is
  loaded off the event loop and swapped in with one assignment. A request keeps the classifier
  object it started with, so it finishes on that version and its response names it.
- `infer(classifier, array)` puts one prepared image into its model's queue; a batcher task takes
  up to `batch_max_size` images (waiting at most `batch_max_latency_ms` for more), groups them by
  classifier version, and runs ONNX Runtime in a thread so the event loop stays free. Requests
  with different `top_k` share a batch because top-k is applied per request afterwards, and a bad
  image never reaches the batch: it fails while decoding, in its own request.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from models import store
from models.errors import ModelNotFound
from models.preprocess import decode_image, resize_and_crop, stack
from models.runtime import OnnxClassifier, RuntimeOptions, default_threads

log = logging.getLogger("tuneserve.service")

_METRICS: dict[str, Any] | None = None


def metrics() -> dict[str, Any]:
    """Per-model Prometheus metrics, created on first use.

    prometheus_client is imported here, not at module import: BentoML workers set
    PROMETHEUS_MULTIPROC_DIR after importing the service module, and prometheus_client picks
    single- or multi-process mode when it is first imported. Metrics registered in the default
    registry then show in BentoML's /metrics, summed over workers.
    """
    global _METRICS
    if _METRICS is None:
        from prometheus_client import Counter, Histogram

        _METRICS = {
            "requests": Counter(
                "tuneserve_requests", "Requests per route, model and outcome", ["route", "model", "outcome"]
            ),
            "images": Counter("tuneserve_images", "Images classified", ["model"]),
            "latency": Histogram(
                "tuneserve_inference_seconds",
                "ONNX Runtime time per batch",
                ["model"],
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            ),
            "batch": Histogram(
                "tuneserve_batch_size",
                "Images per ONNX Runtime call",
                ["model"],
                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            ),
            "reloads": Counter("tuneserve_model_reloads", "Hot reloads of a new latest version", ["model"]),
        }
    return _METRICS


@dataclass
class _Item:
    classifier: OnnxClassifier
    array: np.ndarray
    future: asyncio.Future


class Batcher:
    """Micro-batching queue for one model name (all its versions)."""

    def __init__(self, name: str, max_size: int, max_latency_s: float, executor: ThreadPoolExecutor):
        self.name = name
        self.max_size = max_size
        self.max_latency_s = max_latency_s
        self.executor = executor
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def submit(self, classifier: OnnxClassifier, array: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.queue.put_nowait(_Item(classifier, array, future))
        if self.task is None or self.task.done():
            self.task = loop.create_task(self._run(), name=f"batcher-{self.name}")
        return await future

    async def _collect(self) -> list[_Item]:
        items = [await self.queue.get()]
        while len(items) < self.max_size and not self.queue.empty():
            items.append(self.queue.get_nowait())
        if len(items) < self.max_size and self.max_latency_s > 0:
            deadline = time.monotonic() + self.max_latency_s
            while len(items) < self.max_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), remaining))
                except (asyncio.TimeoutError, TimeoutError):
                    break
                while len(items) < self.max_size and not self.queue.empty():
                    items.append(self.queue.get_nowait())
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            groups: dict[int, list[_Item]] = {}
            for item in items:
                if not item.future.cancelled():
                    groups.setdefault(id(item.classifier), []).append(item)
            for group in groups.values():
                classifier = group[0].classifier
                started = time.perf_counter()
                try:
                    batch = stack([item.array for item in group])
                    probabilities = await loop.run_in_executor(self.executor, classifier.predict, batch)
                except Exception as error:  # one failing batch fails only its own items, never the task
                    log.exception("%s: inference failed for a batch of %d", classifier.tag, len(group))
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(RuntimeError(f"inference failed: {error}"))
                    continue
                try:
                    m = metrics()
                    m["latency"].labels(self.name).observe(time.perf_counter() - started)
                    m["batch"].labels(self.name).observe(len(group))
                    m["images"].labels(self.name).inc(len(group))
                except Exception:  # metrics must never strand the requests of a batch
                    log.exception("could not record metrics for %s", self.name)
                for item, row in zip(group, probabilities):
                    if not item.future.done():
                        item.future.set_result(row)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass


class ModelPool:
    """Loaded classifiers of one worker; see the module docstring."""

    def __init__(self, settings, options: RuntimeOptions | None = None):
        self.settings = settings
        self.options = options or runtime_options(settings)
        decode_threads = settings.decode_threads or default_threads(settings.worker_count)
        self._decode = ThreadPoolExecutor(max_workers=max(1, decode_threads), thread_name_prefix="decode")
        self._infer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        self._load = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self._latest: dict[str, OnnxClassifier] = {}
        self._pinned: OrderedDict[str, OnnxClassifier] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._batchers: dict[str, Batcher] = {}
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
        for batcher in self._batchers.values():
            await batcher.close()
        for executor in (self._decode, self._infer, self._load):
            executor.shutdown(wait=False, cancel_futures=True)

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
            try:
                async with self._lock(name):
                    if self._latest[name].version == latest:
                        continue  # a concurrent check (the poller or POST /models/{name}/reload) swapped it in
                    resolved = await asyncio.to_thread(store.resolve, f"{name}:{latest}")
                    classifier = await self._load_version(resolved)
                    previous = self._latest.get(name)
                    self._latest[name] = classifier  # the atomic swap; in-flight requests keep `previous`
            except Exception as error:
                self._failed[name] = (latest, time.monotonic())
                log.error("hot reload of %s:%s failed, still serving %s: %s", name, latest, current.tag, error)
                continue
            metrics()["reloads"].labels(name).inc()
            log.info("hot reload: %s now serves %s (was %s)", name, classifier.tag, previous.tag if previous else None)
            swapped.append(classifier.tag)
        return swapped

    # ---- work ------------------------------------------------------------------------------
    def _prepare_sync(self, data: bytes, classifier: OnnxClassifier) -> np.ndarray:
        spec = classifier.manifest.preprocessing
        image = decode_image(data, self.settings.max_pixels, self.settings.allowed_formats, draft_size=spec.resize)
        return resize_and_crop(image, spec)

    async def prepare(self, data: bytes, classifier: OnnxClassifier) -> np.ndarray:
        """Decode, check and resize one upload (in a thread); raises models.errors.ImageError."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._decode, self._prepare_sync, data, classifier)

    async def infer(self, classifier: OnnxClassifier, array: np.ndarray) -> np.ndarray:
        """Probabilities for one prepared image, computed in a micro-batch."""
        batcher = self._batchers.get(classifier.name)
        if batcher is None:
            batcher = self._batchers[classifier.name] = Batcher(
                classifier.name,
                self.settings.batch_max_size,
                self.settings.batch_max_latency_ms / 1000.0,
                self._infer,
            )
        return await batcher.submit(classifier, array)

    async def classify(self, classifier: OnnxClassifier, data: bytes, top_k: int) -> list[dict[str, Any]]:
        array = await self.prepare(data, classifier)
        probabilities = await self.infer(classifier, array)
        return classifier.top_k(probabilities[None, :], top_k)[0]

    # ---- description -----------------------------------------------------------------------
    def loaded(self) -> dict[str, dict[str, Any]]:
        described = {}
        for classifier in [*self._latest.values(), *self._pinned.values()]:
            described[classifier.tag] = {**classifier.describe(), "follows_latest": self._latest.get(classifier.name) is classifier}
        return described

    def runtime(self) -> dict[str, Any]:
        from models.runtime import cuda_device_count

        return {
            "options": dict(vars(self.options)),
            "gpus_visible": cuda_device_count(),
            "worker_index": worker_index(),
            "load_errors": dict(self.load_errors),
        }


def worker_index() -> int | None:
    try:
        from bentoml import server_context

        return server_context.worker_index
    except Exception:  # pragma: no cover - outside a BentoML worker
        return None


def preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the pip CUDA 13 wheels so the CUDA provider works without torch."""
    try:
        import onnxruntime

        onnxruntime.preload_dlls()
    except Exception as error:  # the CUDA provider then reports its own fallback reason
        log.warning("onnxruntime.preload_dlls() failed: %s", error)


def runtime_options(settings, gpu_count: int | None = None, index: int | None = None) -> RuntimeOptions:
    """This worker's ONNX Runtime options: its GPU by BentoML worker index, or CPU threads."""
    from models.runtime import cuda_device_count

    gpus = cuda_device_count() if gpu_count is None else gpu_count
    index = worker_index() if index is None else index
    device_id = ((index or 1) - 1) % gpus if gpus and settings.device != "cpu" else 0
    on_gpu = gpus > 0 and settings.device != "cpu"
    if on_gpu:
        preload_cuda_libraries()
    threads = settings.threads or (1 if on_gpu else default_threads(settings.worker_count))
    options = RuntimeOptions(
        device=settings.device,
        device_id=device_id,
        enable_tensorrt=settings.tensorrt,
        fp16=settings.fp16,
        intra_op_threads=threads,
        inter_op_threads=1,
        trt_cache_dir=str(settings.home / "trt-cache") if settings.tensorrt else None,
    )
    log.info(
        "worker %s: %d GPU(s) visible, device=%s device_id=%d, intra-op threads=%d",
        index, gpus, settings.device, device_id, threads,
    )
    return options


__all__ = ["Batcher", "ModelNotFound", "ModelPool", "metrics", "runtime_options", "worker_index"]
