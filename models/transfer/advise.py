"""The transfer advisor: which stored model to start from, and would more labels help.

For each candidate source (a stored version whose graph gives its `embedding`): embed the train
split once, score it with LogME (models/transfer/logme.py), SFDA and a cross-validated cosine k-NN
(models/transfer/transferability.py), and a cross-validated logistic probe, and time the embedding.
Candidates are ranked by the agreement of LogME, SFDA and k-NN: their mean rank (no single score
ranks sources reliably on small data; the probe decides the recommended strategy and is shown,
not ranked by). The best one also gets a learning curve: a probe
fitted on 10/25/50/100 % of the train split, scored on the held-out (val + test) images.
Torch-free: the CLI runs it in process, the service as a durable job (`run_advise_job` below is the
job child's entry; the config and advice.json are models/jobs/advise.py).
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from models.data.datasets import Sample, check_readable, check_trainable, load_dataset, split_samples
from models.errors import Cancelled, DatasetError, EmbeddingUnavailable, ImageError
from models.jobs.advise import AdviseConfig, AdviseConfigError, write_advice
from models.jobs.events import ExitCode, Progress
from models.transfer.logme import logme, probe_accuracy
from models.transfer.transferability import knn_cv_score, rank_by_agreement, reduce, scoring_dims, sfda

log = logging.getLogger("tuneserve.advise")

LINEAR_MARGIN = 0.01  # linear is enough when the probe is within 1 point of perfect
RANKED_BY = ("logme", "sfda", "knn_accuracy")  # the scores whose mean rank orders the candidates


@dataclass
class Candidate:
    model: str
    logme: float
    sfda: float | None  # None when the features do not vary within any class (nothing to fit)
    knn_accuracy: float
    probe_accuracy: float
    embed_seconds: float
    images: int
    dimensions: int
    recommended_strategy: str = "full"
    mean_rank: float = 0.0  # over RANKED_BY; ties share their average rank
    rank: int = 0


def recommend(probe: float) -> str:
    """linear when frozen features already classify (probe within 1 point of perfect), else full."""
    return "linear" if probe >= 1.0 - LINEAR_MARGIN else "full"


def default_candidates() -> list[str]:
    from models.artifact import store

    return [store.resolve(name).tag for name in sorted(store.list_models())]


def _labels_of(samples: list[Sample], labels: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index[s.label] for s in samples], dtype=np.int64)


def score_candidate(ref: str, train: list[Sample], labels: list[str], folds: int, device: str) -> tuple[Candidate, np.ndarray]:
    """Embed `train` with `ref` and score it; also returns the embeddings (the learning curve reuses them)."""
    from models.transfer.instant import embed_samples, load_source
    from models.serving.runtime import RuntimeOptions

    source = load_source(ref, RuntimeOptions(device=device))
    started = time.monotonic()
    features, targets = embed_samples(source, train, labels)
    seconds = time.monotonic() - started
    probe = probe_accuracy(features, targets, folds)
    candidate = Candidate(model=source.tag, logme=round(logme(features, targets), 6), sfda=sfda_score(features, targets),
                          knn_accuracy=round(knn_cv_score(features, targets, folds=folds), 4),
                          probe_accuracy=round(probe, 4), embed_seconds=round(seconds, 3), images=len(targets),
                          dimensions=int(features.shape[1]), recommended_strategy=recommend(probe))
    return candidate, features


def sfda_score(features: np.ndarray, targets: np.ndarray) -> float | None:
    """SFDA on the leading principal components (it fits and scores the same images; see scoring_dims)."""
    dims = scoring_dims(len(targets), int(np.unique(targets).size))
    try:
        return round(sfda(reduce(features, dims), targets), 6)
    except ValueError:  # no variation within any class: the Fisher fit is undefined
        return None


def rank_candidates(candidates: list[Candidate]) -> list[Candidate]:
    """Candidates ordered by the mean rank of their RANKED_BY scores (a missing SFDA ranks last)."""
    by_model = {c.model: c for c in candidates}
    scores = {method: {c.model: float("nan") if getattr(c, method) is None else getattr(c, method) for c in candidates}
              for method in RANKED_BY}
    ranked = []
    for rank, (model, mean_rank) in enumerate(rank_by_agreement(scores), 1):
        by_model[model].rank, by_model[model].mean_rank = rank, round(mean_rank, 3)
        ranked.append(by_model[model])
    return ranked


def learning_curve(ref: str, train: list[Sample], held_out: list[Sample], labels: list[str], features: np.ndarray,
                   fractions: list[float], seed: int, device: str) -> list[dict[str, Any]]:
    """Probe accuracy on `held_out` when fitted on stratified fractions of `train` (≥ 1 image per class)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from models.transfer.instant import embed_samples, load_source
    from models.serving.runtime import RuntimeOptions

    if not held_out:
        return []
    test_x, test_y = embed_samples(load_source(ref, RuntimeOptions(device=device)), held_out, labels)
    train_y = _labels_of(train, labels)
    rng = np.random.default_rng(seed)
    order = {c: rng.permutation(np.flatnonzero(train_y == c)) for c in np.unique(train_y)}
    points = []
    for fraction in sorted(set(fractions)):
        chosen = np.concatenate([idx[: max(1, math.ceil(fraction * len(idx)))] for idx in order.values()])
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(features[chosen], train_y[chosen])
        points.append({"fraction": fraction, "images": int(len(chosen)),
                       "accuracy": round(float((probe.predict(test_x) == test_y).mean()), 4)})
    return points


def _check(stop: threading.Event | None, what: str) -> None:
    if stop is not None and stop.is_set():
        raise Cancelled(f"cancelled {what}")


def advise(config: AdviseConfig, on_progress: Callable[..., None] | None = None,
           stop: threading.Event | None = None) -> dict[str, Any]:
    """Rank the candidates for `config.data`; the returned dict is what advice.json holds."""
    started = time.monotonic()
    emit = on_progress or (lambda **_: None)
    config.validate()
    samples = load_dataset(config.data)
    counts = check_trainable(samples, config.min_images_per_class)
    check_readable(samples)
    splits = split_samples(samples, config.val_fraction, config.test_fraction, config.seed)
    labels = sorted(counts)
    train, held_out = splits["train"], splits["val"] + splits["test"]
    refs = config.candidates or default_candidates()
    ranked, skipped, features = [], [], {}
    for done, ref in enumerate(refs):
        _check(stop, f"before candidate {ref}")
        emit(step=done, steps=len(refs), candidate=ref)
        try:
            candidate, embedded = score_candidate(ref, train, labels, config.folds, config.device)
        except EmbeddingUnavailable as error:
            if config.candidates:  # asked for by name: say so loudly
                raise
            skipped.append({"model": ref, "reason": str(error)})
            continue
        ranked.append(candidate)
        features[candidate.model] = embedded
        log.info("advise: %s LogME %.3f SFDA %s k-NN %.3f probe %.3f (%.1fs)", candidate.model, candidate.logme,
                 candidate.sfda, candidate.knn_accuracy, candidate.probe_accuracy, candidate.embed_seconds)
    if not ranked:
        raise EmbeddingUnavailable(f"no candidate can be embedded: {skipped}")
    ranked = rank_candidates(ranked)
    best = ranked[0]
    _check(stop, "before the learning curve")
    emit(step=len(refs), steps=len(refs), candidate="learning curve")
    curve = learning_curve(best.model, train, held_out, labels, features[best.model], config.curve, config.seed, config.device)
    return {
        "dataset": {"classes": len(labels), "images": len(samples), "train": len(train), "held_out": len(held_out),
                    "per_class": counts},
        "candidates": [asdict(c) for c in ranked],
        "skipped": skipped,
        "best": best.model,
        "recommended_strategy": best.recommended_strategy,
        "learning_curve": curve,
        "seconds": round(time.monotonic() - started, 2),
    }


def run_advise_job(config_path: str | Path, progress: Progress, stop: threading.Event | None = None) -> int:
    """The job child's body for `"kind": "advise"`: progress events, advice.json, an exit code like training's."""
    try:
        config = AdviseConfig.from_dict(json.loads(Path(config_path).read_text())).validate()
        progress.phase("loading")
        advice = advise(config, lambda step, steps, **detail: progress.count(step, steps, **detail), stop)
    except Cancelled as error:
        progress.failed(f"cancelled (SIGTERM): {error}", cancelled=True)
        return ExitCode.TERMINATED
    except (AdviseConfigError, DatasetError, ImageError, EmbeddingUnavailable) as error:
        progress.failed(str(error))
        return ExitCode.BAD_INPUT
    if config.output_dir:
        write_advice(advice, config.output_dir)
    ranking = [c["model"] for c in advice["candidates"]]
    scores = [{key: c[key] for key in ("model", "rank", "mean_rank", *RANKED_BY, "probe_accuracy")}
              for c in advice["candidates"]]
    progress.advised({"best": advice["best"], "recommended_strategy": advice["recommended_strategy"],
                      "ranking": ranking, "scores": scores,
                      "seconds": advice["seconds"]})
    return ExitCode.OK
