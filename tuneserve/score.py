"""`tuneserve score`: run a stored model over a folder or manifest of images, to CSV, JSONL or Parquet.

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
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger("tuneserve.score")

from tuneserve.score_output import (  # noqa: F401  (re-exported for the Ray engine and tests)
    FORMATS,
    Journal,
    _arrow_schema,
    done_rows,
    evaluate_rows,
    journal_path,
    output_format,
    read_rows,
    report_path,
    write_rows,
)


# --------------------------------------------------------------------------- command line


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "score",
        help="score a folder or manifest of images with a stored model, to CSV, JSONL or Parquet",
        description="Score images with a stored model. Resumable: rerun with the same --output to continue.",
    )
    p.add_argument("--model", required=True, help="name or name:version (default version: latest)")
    p.add_argument("--input", required=True, type=Path, help="folder of images (plain, recursive; or one folder per class), or a .csv/.jsonl manifest with path[,label]")
    p.add_argument("--output", required=True, type=Path, help="output file: .csv, .jsonl or .parquet")
    p.add_argument("--top-k", type=int, default=5, help="labels per image (default 5)")
    p.add_argument("--min-confidence", metavar="P|auto",
                   help="abstain (empty label, abstained=true) below this top probability; 'auto': the model's "
                        "per-label best-F1 thresholds, and abstain on out-of-domain images too")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="local: decode workers (default: cores); ray: actors (default 1)")
    p.add_argument("--pool", choices=["thread", "process"], default="thread", help="local decode pool (default thread)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "int8", "fp16"], default="auto",
                   help="graph variant: auto = int8 on CPU when it passed its accuracy gate, fp16 on GPU (default auto)")
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--num-gpus", type=float, default=0.0, help="ray: GPUs per actor (e.g. 1, or 0.5 to share)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="ray: CPUs per actor (also its ONNX Runtime threads)")
    p.add_argument("--ray-address", help="ray: cluster address (ray://host:10001 or auto); default $RAY_ADDRESS, else a local Ray")
    p.add_argument("--no-eval", action="store_true", help="ignore labels in the input; do not write the evaluation report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_score)


def run_score(args: argparse.Namespace) -> int:
    from models.errors import DatasetError

    if args.output.suffix.lower() not in FORMATS:
        raise DatasetError(f"output must end in .csv, .jsonl or .parquet, got {args.output.name}")
    if args.top_k < 1 or args.batch_size < 1:
        raise DatasetError("--top-k and --batch-size must be at least 1")
    from models.decision import parse_min_confidence

    options = dict(
        top_k=args.top_k, batch_size=args.batch_size, use_labels=not args.no_eval, progress=not args.no_progress,
        min_confidence=parse_min_confidence(args.min_confidence),
    )
    if args.engine == "ray":
        from tuneserve.ray_score import score_ray

        result = score_ray(
            args.model, args.input, args.output, concurrency=args.workers or 1, num_gpus=args.num_gpus,
            cpus_per_actor=args.cpus_per_actor, address=args.ray_address, device=args.device,
            precision=args.precision, **options,
        )
    else:
        result = score(
            args.model, args.input, args.output, workers=args.workers, pool=args.pool, device=args.device,
            precision=args.precision, **options
        )
    print(result.summary_line(), file=sys.stderr)
    if result.report is not None:
        from models.manifest import eval_summary

        print(json.dumps({"eval": eval_summary(result.report), "report": str(result.report_path)}, indent=2))
    return 0


# --------------------------------------------------------------------------- inputs and rows


@dataclass
class ScoreInput:
    root: Path
    samples: list  # models.datasets.Sample
    labelled: bool

    def key(self, sample) -> str:
        return relative_key(sample.path, self.root)


def relative_key(path: str | Path, root: Path) -> str:
    path = Path(path)
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def collect_input(source: Path, model_labels: Sequence[str], use_labels: bool = True) -> ScoreInput:
    """Folder (plain or one per class) or manifest → samples; labels kept only when they can be evaluated."""
    from models.datasets import MANIFEST_NAMES, load_samples
    from models.errors import DatasetError

    source = Path(source)
    samples = load_samples(source, require_labels=False, require_files=False)
    from_manifest = source.is_file() or any((source / n).is_file() for n in MANIFEST_NAMES)
    if from_manifest:  # manifest paths arrive resolved
        root = (source.parent if source.is_file() else source).resolve()
    else:  # folder paths arrive as source/...: make them absolute (for Ray workers) without resolving links
        root = source.absolute()
        samples = [replace(s, path=s.path.absolute()) for s in samples]
    labels = {s.label for s in samples}
    labelled = use_labels and None not in labels
    if use_labels and from_manifest and labels != {None} and None in labels:
        raise DatasetError("the manifest labels some images but not others; label all of them, or pass --no-eval")
    if labelled:
        unknown = sorted(labels - set(model_labels))
        if unknown and from_manifest:
            raise DatasetError(f"manifest labels not known to the model: {unknown[:10]}; pass --no-eval to score without them")
        if unknown:
            log.warning("sub-folder names %s are not labels of the model; scoring without evaluation", unknown[:5])
            labelled = False
    if not labelled:
        samples = [replace(s, label=None) for s in samples]
    return ScoreInput(root, samples, labelled)


def columns_for(top_k: int, labelled: bool) -> list[str]:
    columns = ["path", "label", "abstained", "in_domain"]
    for i in range(1, top_k + 1):
        columns += [f"label_{i}", f"probability_{i}"]
    columns += ["model", "version", "variant", "error"]
    if labelled:
        columns.append("true_label")
    return columns


def make_row(
    path: str, model: str, version: str, top: list[dict] | None, k: int, error: str | None, true_label: str | None,
    labelled: bool, variant: str | None = None, decision: dict[str, Any] | None = None,
) -> dict[str, Any]:
    decision = decision or {}
    row: dict[str, Any] = {"path": path, "label": decision.get("label"), "abstained": decision.get("abstained"),
                           "in_domain": decision.get("in_domain")}
    for i in range(k):
        entry = top[i] if top and i < len(top) else None
        row[f"label_{i + 1}"] = entry["label"] if entry else None
        row[f"probability_{i + 1}"] = entry["probability"] if entry else None
    row.update(model=model, version=version, variant=variant, error=error)
    if labelled:
        row["true_label"] = true_label
    return row


def error_text(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def plan(source: Path, output: Path, model_labels: list[str], top_k: int, use_labels: bool):
    """Input, k, output columns and the samples still to score (both engines resume the same way)."""
    k = min(top_k, len(model_labels))
    data = collect_input(Path(source), model_labels, use_labels)
    columns = columns_for(k, data.labelled)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = done_rows(output, columns)
    todo = [s for s in data.samples if data.key(s) not in done]
    return data, k, columns, todo


def rows_for(classifier, keys: list[str], prepared: list[tuple[Any, str | None]], k: int,
             true_labels: Sequence[str | None], labelled: bool, min_confidence=None) -> list[dict[str, Any]]:
    """One output row per image: the readable ones go through the model in one batch."""
    from models.decision import decide
    from models.preprocess import stack

    arrays = [array for array, _ in prepared if array is not None]
    decided = []
    if arrays:
        probabilities, in_domain = classifier.predict_scored(stack(arrays))
        scores = in_domain if in_domain is not None else [None] * len(arrays)
        decided = [decide(classifier.manifest, top, min_confidence, score)
                   for top, score in zip(classifier.top_k(probabilities, k), scores)]
    made = iter(decided)
    rows = []
    for key, (array, error), true_label in zip(keys, prepared, true_labels):
        decision = next(made) if array is not None else None
        rows.append(make_row(key, classifier.name, classifier.version, decision and decision["predictions"], k,
                             error, true_label, labelled, classifier.variant, decision))
    return rows


# --------------------------------------------------------------------------- local engine


@dataclass
class ScoreResult:
    output: Path
    total: int
    scored: int  # scored by this run
    skipped: int  # already in the output or journal
    errors: int  # error rows written by this run
    seconds: float
    report: dict[str, Any] | None = None
    report_path: Path | None = None

    @property
    def images_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0

    def summary_line(self) -> str:
        return (
            f"scored {self.scored} images ({self.errors} unreadable) in {self.seconds:.1f}s "
            f"({self.images_per_second:.1f} images/s); {self.skipped} already done; {self.total} rows in {self.output}"
        )


def _prepare_one(data, spec, max_pixels: int):
    """Path or bytes → (uint8 array, None), or (None, error text) for an unreadable image."""
    from models.preprocess import prepare

    try:
        return prepare(data, spec, max_pixels), None
    except Exception as error:  # noqa: BLE001 - one bad image must not stop a million-image run
        return None, error_text(error)


def _prepare_many(paths: list[str], spec, max_pixels: int):
    return [_prepare_one(p, spec, max_pixels) for p in paths]


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
            return [self.executor.submit(_prepare_one, p, self.spec, self.max_pixels) for p in paths]
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
    from models import store
    from models.runtime import OnnxClassifier, RuntimeOptions

    version = store.resolve(ref)
    options = RuntimeOptions(device=device, precision=precision)
    return OnnxClassifier(version.path, version.name, version.version, options).load()


def progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="img", desc="scoring", disable=not enabled, dynamic_ncols=True,
        smoothing=0.1, file=sys.stderr,
    )


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
    from models.decision import check_supported
    from models.preprocess import DEFAULT_MAX_PIXELS

    output = Path(output)
    fmt = output_format(output)
    classifier = classifier or load_model(model, device, precision)
    labels = classifier.manifest.labels
    check_supported(min_confidence, classifier.manifest, classifier.tag)
    data, k, columns, todo = plan(source, output, labels, top_k, use_labels)
    workers = workers or default_workers()
    log.info(
        "%s: %d images, %d already done, %d to score (%s, %s pool x%d)",
        classifier.tag, len(data.samples), len(data.samples) - len(todo), len(todo), fmt, pool, workers,
    )
    journal = Journal(output)
    spec = classifier.manifest.preprocessing
    decoder = _Decoder(pool, workers, spec, max_pixels or DEFAULT_MAX_PIXELS)
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    pending: deque[tuple[list, list[Future]]] = deque()
    errors = 0
    bar = progress_bar(len(todo), progress)
    finished_cleanly = False
    start = time.perf_counter()  # the rate counts the scoring itself, not model loading
    try:
        next_batch = 0
        for done_batches in range(1, len(batches) + 1):
            while next_batch < len(batches) and len(pending) < prefetch + 1:
                batch = batches[next_batch]
                pending.append((batch, decoder.submit([str(s.path) for s in batch])))
                next_batch += 1
            batch, futures = pending.popleft()
            prepared = decoder.gather(futures)
            errors += sum(error is not None for _, error in prepared)
            rows = rows_for(classifier, [data.key(s) for s in batch], prepared, k, [s.label for s in batch], data.labelled,
                            min_confidence)
            journal.append(rows)
            bar.update(len(batch))
            if on_batch:
                on_batch(done_batches)
        finished_cleanly = True
    finally:
        bar.close()
        decoder.close(cancel=not finished_cleanly)
        if not finished_cleanly:
            log.warning("interrupted: finished batches are kept in %s; rerun the same command to resume", journal.path)
    seconds = time.perf_counter() - start
    total = journal.finish(columns)
    result = ScoreResult(output, total, len(todo), len(data.samples) - len(todo), errors, seconds)
    if data.labelled:
        attach_report(result, labels, k, classifier.tag)
    return result


def attach_report(result: ScoreResult, labels: list[str], k: int, model_tag: str) -> None:
    report = evaluate_rows(read_rows(result.output), labels, k, model_tag)
    if report is None:
        log.warning("no readable labelled images: no evaluation report")
        return
    path = report_path(result.output)
    path.write_text(json.dumps(report, indent=2))
    result.report, result.report_path = report, path
