"""The engine-neutral core of `tuneserve score`: plan, run an engine, write the output, attach the report.

An engine (the local decode pool in score.py, Ray Data in ray_score.py) knows the model's labels and
tag and scores the planned samples into the journal; everything else (which samples are still to
do, the row shape, the progress bar, the atomic output, the evaluation report) is here, once.
See score_output.py for the journal and the formats.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, Sequence

from tuneserve.score_output import Journal, done_rows, evaluate_rows, read_rows, report_path

log = logging.getLogger("tuneserve.score")


@dataclass
class ScoreInput:
    root: Path
    samples: list  # models.data.datasets.Sample
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
    from models.data.datasets import MANIFEST_NAMES, load_samples
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


@dataclass
class Plan:
    """What one run scores: the input, k, the output columns and the samples not yet in the output."""

    data: ScoreInput
    k: int
    columns: list[str]
    todo: list  # models.data.datasets.Sample

    @property
    def skipped(self) -> int:
        return len(self.data.samples) - len(self.todo)


def plan(source: Path, output: Path, model_labels: list[str], top_k: int, use_labels: bool) -> Plan:
    """Input, k, output columns and the samples still to score (every engine resumes the same way)."""
    k = min(top_k, len(model_labels))
    data = collect_input(Path(source), model_labels, use_labels)
    columns = columns_for(k, data.labelled)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = done_rows(output, columns)
    return Plan(data, k, columns, [s for s in data.samples if data.key(s) not in done])


def rows_for(classifier, keys: list[str], prepared: list[tuple[Any, str | None]], k: int,
             true_labels: Sequence[str | None], labelled: bool, min_confidence=None) -> list[dict[str, Any]]:
    """One output row per image: the readable ones go through the model in one batch."""
    from models.serving.decision import decide
    from models.serving.preprocess import stack

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


class Engine(Protocol):
    tag: str  # name:version of the model, for logs and the report
    labels: list[str]
    description: str  # how it runs, for the log ("thread pool x4", "ray, 2 actors")

    def run(self, plan: Plan, journal: Journal, bar: Any) -> int:
        """Score `plan.todo` into `journal`, advancing `bar`; returns the number of error rows written."""


def run_engine(engine: Engine, source: Path, output: Path, top_k: int, use_labels: bool, progress: bool) -> ScoreResult:
    """Plan, let `engine` score what is left, write the output from the journal, attach the report."""
    output = Path(output)
    job = plan(source, output, engine.labels, top_k, use_labels)
    log.info("%s: %d images, %d already done, %d to score (%s, %s)", engine.tag, len(job.data.samples), job.skipped,
             len(job.todo), output.suffix.lstrip("."), engine.description)
    journal = Journal(output)
    bar = progress_bar(len(job.todo), progress)
    finished_cleanly = False
    start = time.perf_counter()  # the rate counts the scoring itself, not model loading
    try:
        errors = engine.run(job, journal, bar)
        finished_cleanly = True
    finally:
        bar.close()
        if not finished_cleanly:
            log.warning("interrupted: finished batches are kept in %s; rerun the same command to resume", journal.path)
    seconds = time.perf_counter() - start
    total = journal.finish(job.columns)
    result = ScoreResult(output, total, len(job.todo), job.skipped, errors, seconds)
    if job.data.labelled:
        return with_report(result, engine.labels, job.k, engine.tag)
    return result


def prepare_one(data, spec, max_pixels: int):
    """Path or bytes → (uint8 array, None), or (None, error text) for an unreadable image."""
    from models.serving.preprocess import prepare

    try:
        return prepare(data, spec, max_pixels), None
    except Exception as error:  # noqa: BLE001 - one bad image must not stop a million-image run
        return None, error_text(error)


def progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="img", desc="scoring", disable=not enabled, dynamic_ncols=True,
        smoothing=0.1, file=sys.stderr,
    )


def with_report(result: ScoreResult, labels: list[str], k: int, model_tag: str) -> ScoreResult:
    """Evaluate the output's labelled rows, write the report next to it; `result` with the report."""
    report = evaluate_rows(read_rows(result.output), labels, k, model_tag)
    if report is None:
        log.warning("no readable labelled images: no evaluation report")
        return result
    path = report_path(result.output)
    path.write_text(json.dumps(report, indent=2))
    return replace(result, report=report, report_path=path)
