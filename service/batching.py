"""Per-model micro-batching, owned by the data plane (service/dataplane.py): one queue and one batcher
task per model name (all its versions), and the one inference thread they share.

`submit(classifier, array, extras)` puts one prepared image into the queue; the batcher takes up to
`max_size` images (waiting at most `max_latency_s` for more), groups them by classifier version,
and runs ONNX Runtime once per group in a thread so the event loop stays free. `extras` names graph
outputs wanted beside the probabilities (`logits`, `embedding`); a group fetches the union of its
items' extras in the same pass, so asking for logits costs no second run. Requests with different
`top_k` share a batch because top-k is applied per request afterwards, and a bad image never reaches
the batch: it fails while decoding, in its own request.

Overload is refused, not queued (service/admission.py): a queue holds at most `max_queued` images
(one more is answered 503 at once), and an image that waited past `deadline_s` is answered 503
without running.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from models.serving.preprocess import stack
from models.serving.runtime import OnnxClassifier
from service.admission import Overloaded, shed
from service.pool.metrics import metrics, observe

log = logging.getLogger("tuneserve.service")
EXTRAS = ("logits", "embedding", "evidence")  # graph outputs a caller may ask for beside the probabilities


class Row(NamedTuple):
    """One image's outputs: probabilities `[C]`, in-domain score (None without OOD data), and the
    extras asked for by any request of its batch (None where no one asked)."""

    probabilities: np.ndarray
    in_domain: float | None
    logits: np.ndarray | None = None
    embedding: np.ndarray | None = None
    evidence: np.ndarray | None = None  # [C, side, side]


def run_batch(classifier: OnnxClassifier, batch: np.ndarray, extras: frozenset[str]) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """One ONNX Runtime pass: probabilities `[N, C]`, in-domain scores `[N]` or None, and `extras`."""
    if not extras:
        probabilities, in_domain = classifier.predict_scored(batch)
        return probabilities, in_domain, {}
    manifest = classifier.manifest
    names = {"logits": manifest.output_names[0], "probabilities": manifest.output_names[1]}
    if "embedding" in extras or classifier.ood is not None:
        names["embedding"] = classifier.require_embedding("the embedding output")
    if "evidence" in extras:  # only when asked: it is C·side² floats per image to copy out
        names["evidence"] = classifier.require_evidence()
    wanted = ["probabilities", *sorted(n for n in names if n != "probabilities")]
    values = dict(zip(wanted, classifier.run(batch, [names[n] for n in wanted])))
    in_domain = classifier.ood.score(values["embedding"]) if classifier.ood is not None else None
    return values["probabilities"], in_domain, {name: values[name] for name in extras}


@dataclass(frozen=True)
class QueueLimits:
    """The bounds of every model's queue in one worker (settings: max_queued_images, request_deadline_s)."""

    max_queued: int = 256
    deadline_s: float = 5.0
    retry_after_s: int = 1


@dataclass
class _Item:
    classifier: OnnxClassifier
    array: np.ndarray
    extras: frozenset[str]
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Micro-batching queue for one model name (all its versions)."""

    def __init__(self, name: str, max_size: int, max_latency_s: float, executor: ThreadPoolExecutor,
                 limits: QueueLimits = QueueLimits()):
        self.name = name
        self.max_size = max_size
        self.max_latency_s = max_latency_s
        self.executor = executor
        self.limits = limits
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.seconds_per_image = 0.0  # moving average of ONNX Runtime time per image, for the expected wait

    def expected_wait_s(self) -> float:
        """How long an image queued now would wait, from the queue's length and recent batches."""
        return (self.queue.qsize() + 1) * self.seconds_per_image

    def _refusal(self) -> str | None:
        if self.queue.qsize() >= self.limits.max_queued:
            return (f"{self.queue.qsize()} images wait for model {self.name!r}, the limit "
                    f"(TUNESERVE_MAX_QUEUED_IMAGES={self.limits.max_queued})")
        if self.expected_wait_s() > self.limits.deadline_s:  # it would only be refused later, after waiting
            return (f"an image would wait about {self.expected_wait_s():.1f} s for model {self.name!r}, past the deadline "
                    f"(TUNESERVE_REQUEST_DEADLINE_S={self.limits.deadline_s:g})")
        return None

    async def submit(self, classifier: OnnxClassifier, array: np.ndarray, extras: frozenset[str] = frozenset()) -> Row:
        """The `Row` of one prepared image: probabilities, in-domain score, and the `extras` asked for."""
        refusal = self._refusal()
        if refusal is not None:
            shed("batcher", "queue")
            raise Overloaded(f"overloaded: {refusal}; retry after {self.limits.retry_after_s} s", self.limits.retry_after_s)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.queue.put_nowait(_Item(classifier, array, frozenset(extras), future))
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
        while True:
            # one call per batch: no local of this frame keeps the last batch's classifier alive while
            # the queue idles, so a version the pool unloads is freed (service/pool/registry.py)
            await self._run_items(self._within_deadline(await self._collect()))

    async def _run_items(self, items: list[_Item]) -> None:
        groups: dict[int, list[_Item]] = {}
        for item in items:
            groups.setdefault(id(item.classifier), []).append(item)
        for group in groups.values():
            await self._run_group(group)

    def _within_deadline(self, items: list[_Item]) -> list[_Item]:
        """The items still wanted: a cancelled one is dropped, one past its deadline answered 503."""
        now, kept = time.perf_counter(), []
        for item in items:
            if item.future.done():
                continue
            waited = now - item.queued
            if waited > self.limits.deadline_s:
                shed("batcher", "deadline")
                item.future.set_exception(Overloaded(
                    f"overloaded: the image waited {waited:.1f} s for model {self.name!r}, past the deadline "
                    f"(TUNESERVE_REQUEST_DEADLINE_S={self.limits.deadline_s:g}); retry after {self.limits.retry_after_s} s",
                    self.limits.retry_after_s))
            else:
                kept.append(item)
        return kept

    async def _run_group(self, group: list[_Item]) -> None:
        """One ONNX Runtime call for the items of one classifier version; results to their futures."""
        loop = asyncio.get_running_loop()
        classifier = group[0].classifier
        started = time.perf_counter()
        for item in group:
            observe("queue", self.name, started - item.queued)
        try:
            batch = stack([item.array for item in group])
            extras = frozenset().union(*(item.extras for item in group))
            probabilities, in_domain, more = await loop.run_in_executor(self.executor, run_batch, classifier, batch, extras)
        except Exception as error:  # one failing batch fails only its own items, never the task
            log.exception("%s: inference failed for a batch of %d", classifier.tag, len(group))
            for item in group:
                if not item.future.done():
                    item.future.set_exception(RuntimeError(f"inference failed: {error}"))
            return
        elapsed = time.perf_counter() - started
        self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * elapsed / len(group) if self.seconds_per_image else elapsed / len(group)
        try:
            m = metrics()
            m["latency"].labels(self.name).observe(elapsed)
            m["batch"].labels(self.name).observe(len(group))
            m["images"].labels(self.name).inc(len(group))
        except Exception:  # metrics must never strand the requests of a batch
            log.exception("could not record metrics for %s", self.name)
        scores = in_domain if in_domain is not None else [None] * len(group)
        for index, (item, score) in enumerate(zip(group, scores)):
            if not item.future.done():
                asked = {name: more[name][index] for name in item.extras}
                item.future.set_result(Row(probabilities[index], None if score is None else float(score), **asked))

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass


class Batchers:
    """The batcher of each model name, created on first use, all feeding one ONNX Runtime thread (one
    inference at a time per worker: its cores are ORT's intra-op threads)."""

    def __init__(self, max_size: int, max_latency_s: float, limits: QueueLimits = QueueLimits()):
        self.max_size = max_size
        self.max_latency_s = max_latency_s
        self.limits = limits
        self._infer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        self._by_name: dict[str, Batcher] = {}

    async def submit(self, classifier: OnnxClassifier, array: np.ndarray, extras: frozenset[str] = frozenset()) -> Row:
        """One prepared image through its model's micro-batcher: probabilities, in-domain score, `extras`."""
        batcher = self._by_name.get(classifier.name)
        if batcher is None:
            batcher = self._by_name[classifier.name] = Batcher(classifier.name, self.max_size, self.max_latency_s, self._infer,
                                                              self.limits)
        return await batcher.submit(classifier, array, extras)

    async def close(self) -> None:
        for batcher in self._by_name.values():
            await batcher.close()
        self._infer.shutdown(wait=False, cancel_futures=True)
