"""`tuneserve score` on this machine: run a stored model over a folder or manifest of images, to CSV, JSONL or Parquet.

One row per image: `path` (relative to the input folder, or to the manifest's folder), the decided
`label` (empty when the model abstained under `--min-confidence`), `abstained`, `in_domain` (for
versions exported with an in-domain score), the top-k labels and probabilities as flat columns
`label_1, probability_1, ... label_k, probability_k`,
`model`, `version`, `error` (empty unless the image could not be read) and, for labelled input,
`true_label`. The same columns in every format and on both engines.

Resumable and never half-written: complete rows are appended, a batch at a time, to a journal
(`OUTPUT.partial.jsonl`) and fsynced; the output file is written from the journal (and from an
earlier finished output, when a rerun adds images) to a temporary file and renamed into place at
the end. A rerun skips every path already in the output or the journal; a line torn by a kill is
dropped and its image scored again.

This module is the local engine: images are decoded and preprocessed ahead of the model on a thread
or process pool. The plan, the rows and the output are score_core.py's; Ray Data: ray_score.py.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from tuneserve.score_core import Plan, ScoreResult, prepare_one, rows_for, run_engine
from tuneserve.score_output import Journal, output_format

log = logging.getLogger("tuneserve.score")


def _prepare_many(paths: list[str], spec, max_pixels: int):
    return [prepare_one(p, spec, max_pixels) for p in paths]


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _Decoder:
    """Decode + preprocess batches ahead of the model on a thread or process pool."""

    def __init__(self, pool: str, workers: int, spec, max_pixels: int):
        self.kind = pool
        self.workers = workers
        self.spec = spec
        self.max_pixels = max_pixels
        self.executor: Executor = (
            ProcessPoolExecutor(max_workers=workers) if pool == "process" else ThreadPoolExecutor(max_workers=workers)
        )

    def submit(self, paths: list[str]) -> list[Future]:
        if self.kind == "thread":
            return [self.executor.submit(prepare_one, p, self.spec, self.max_pixels) for p in paths]
        step = max(1, -(-len(paths) // self.workers))
        return [
            self.executor.submit(_prepare_many, paths[i : i + step], self.spec, self.max_pixels)
            for i in range(0, len(paths), step)
        ]

    def gather(self, futures: list[Future]) -> list[tuple[Any, str | None]]:
        if self.kind == "thread":
            return [f.result() for f in futures]
        return [item for f in futures for item in f.result()]

    def close(self, cancel: bool = False) -> None:
        self.executor.shutdown(wait=not cancel, cancel_futures=cancel)


def load_model(ref: str, device: str = "auto", precision: str = "auto"):
    from models.artifact import store
    from models.serving.runtime import OnnxClassifier, RuntimeOptions

    version = store.resolve(ref)
    options = RuntimeOptions(device=device, precision=precision)
    return OnnxClassifier(version.path, version.name, version.version, options).load()


class LocalEngine:
    """Decode batches ahead on a pool (`prefetch` batches in flight), run the model a batch at a time."""

    def __init__(self, classifier, batch_size: int, workers: int, pool: str, max_pixels: int, prefetch: int,
                 min_confidence=None, on_batch: Callable[[int], None] | None = None):
        self.classifier, self.batch_size, self.workers, self.pool = classifier, batch_size, workers, pool
        self.max_pixels, self.prefetch, self.min_confidence, self.on_batch = max_pixels, prefetch, min_confidence, on_batch
        self.tag, self.labels = classifier.tag, classifier.manifest.labels
        self.description = f"{pool} pool x{workers}"

    def run(self, plan: Plan, journal: Journal, bar: Any) -> int:
        decoder = _Decoder(self.pool, self.workers, self.classifier.manifest.preprocessing, self.max_pixels)
        todo, size = plan.todo, self.batch_size
        batches = [todo[i : i + size] for i in range(0, len(todo), size)]
        pending: deque[tuple[list, list[Future]]] = deque()
        errors, next_batch, finished_cleanly = 0, 0, False
        try:
            for done_batches in range(1, len(batches) + 1):
                while next_batch < len(batches) and len(pending) < self.prefetch + 1:
                    pending.append((batches[next_batch], decoder.submit([str(s.path) for s in batches[next_batch]])))
                    next_batch += 1
                batch, futures = pending.popleft()
                prepared = decoder.gather(futures)
                errors += sum(error is not None for _, error in prepared)
                journal.append(rows_for(self.classifier, [plan.data.key(s) for s in batch], prepared, plan.k,
                                        [s.label for s in batch], plan.data.labelled, self.min_confidence))
                bar.update(len(batch))
                if self.on_batch:
                    self.on_batch(done_batches)
            finished_cleanly = True
        finally:
            decoder.close(cancel=not finished_cleanly)
        return errors


def score(
    model: str,
    source: Path,
    output: Path,
    top_k: int = 5,
    batch_size: int = 64,
    workers: int = 0,
    pool: str = "thread",
    device: str = "auto",
    use_labels: bool = True,
    progress: bool = True,
    precision: str = "auto",
    max_pixels: int | None = None,
    prefetch: int = 2,
    classifier=None,
    on_batch: Callable[[int], None] | None = None,
    min_confidence=None,
) -> ScoreResult:
    """Score `source` into `output` on this machine; resumes from what `output` already holds.

    `on_batch(n_batches_done)` runs after each batch is safely journaled (tests use it to interrupt).
    """
    from models.serving.decision import check_supported
    from models.serving.preprocess import DEFAULT_MAX_PIXELS

    output_format(Path(output))  # refuse an unknown format before loading anything
    classifier = classifier or load_model(model, device, precision)
    check_supported(min_confidence, classifier.manifest, classifier.tag)
    engine = LocalEngine(classifier, batch_size, workers or default_workers(), pool, max_pixels or DEFAULT_MAX_PIXELS,
                         prefetch, min_confidence, on_batch)
    return run_engine(engine, source, output, top_k, use_labels, progress)
