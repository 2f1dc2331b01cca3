"""`tuneserve score --engine ray`: the same scoring pipeline on Ray Data.

`read_binary_files` → `map_batches(_RayScorer)`: each actor holds one ONNX Runtime session
(`models.runtime.OnnxClassifier`), decodes and preprocesses its batch with `models.preprocess`
exactly as the local engine does, and returns the same columns. The model travels through the
Ray object store (model.onnx + manifest.json), so cluster nodes need no copy of the model store;
the images must be readable at the same paths on every node (shared storage).

The driver streams result batches into the same journal as the local engine, so the output
(one Parquet, CSV or JSONL file), resume and the evaluation report behave identically.
Ray is optional (`pip install 'tuneserve[ray]'`) and imported only here.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from tuneserve.score import (
    Journal,
    ScoreResult,
    _prepare_one,
    attach_report,
    columns_for,
    make_row,
    plan,
    progress_bar,
    relative_key,
    rows_for,
)

log = logging.getLogger("tuneserve.ray_score")


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        from models.errors import TuneserveError

        raise TuneserveError(
            f"--engine ray needs Ray Data, which is not installed ({error}); install it with: pip install 'tuneserve[ray]'"
        ) from None
    return ray


class _RayScorer:
    """One ONNX Runtime session per actor; bytes in, output columns out."""

    def __init__(self, model_files, name: str, version: str, device: str, threads: int, top_k: int, root: str,
                 precision: str = "auto", min_confidence=None):
        import ray

        from models.runtime import OnnxClassifier, RuntimeOptions

        if isinstance(model_files, ray.ObjectRef):  # a ref nested in kwargs is not resolved for us
            model_files = ray.get(model_files)
        self._dir = tempfile.TemporaryDirectory(prefix="tuneserve-model-")
        for filename, content in model_files.items():
            Path(self._dir.name, filename).write_bytes(content)
        options = RuntimeOptions(device=device, intra_op_threads=max(1, threads), precision=precision)
        self.model = OnnxClassifier(self._dir.name, name, version, options).load()
        self.top_k = top_k
        self.min_confidence = min_confidence
        self.root = Path(root)

    def __call__(self, batch):
        import pyarrow as pa

        from models.preprocess import DEFAULT_MAX_PIXELS
        from tuneserve.score_output import _arrow_schema

        spec = self.model.manifest.preprocessing
        keys = [relative_key(path, self.root) for path in batch.column("path").to_pylist()]
        prepared = [_prepare_one(blob, spec, DEFAULT_MAX_PIXELS) for blob in batch.column("bytes").to_pylist()]
        rows = rows_for(self.model, keys, prepared, self.top_k, [None] * len(keys), False, self.min_confidence)
        return pa.Table.from_pylist(rows, schema=_arrow_schema(columns_for(self.top_k, False)))


def _connect(ray, address: str | None, num_cpus: int | None) -> bool:
    """Connect or start Ray; True when this call started it (and should shut it down)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True


def score_ray(
    model: str,
    source: Path,
    output: Path,
    top_k: int = 5,
    batch_size: int = 64,
    concurrency: int = 1,
    num_gpus: float = 0.0,
    cpus_per_actor: float = 1.0,
    address: str | None = None,
    device: str = "auto",
    use_labels: bool = True,
    progress: bool = True,
    precision: str = "auto",
    num_cpus: int | None = None,
    min_confidence=None,
) -> ScoreResult:
    """Score `source` into `output` with Ray Data; same rows, resume and report as `score.score`."""
    from models import store
    from models.manifest import MANIFEST_FILE, ONNX_FILE, read_manifest

    from models.decision import check_supported
    from models.errors import TuneserveError

    ray = import_ray()
    if device == "cuda" and not num_gpus:
        raise TuneserveError("--engine ray --device cuda needs --num-gpus (GPUs per actor, e.g. 1 or 0.5)")
    output = Path(output)
    start = time.perf_counter()
    version = store.resolve(model)
    manifest = read_manifest(version.path)
    labels = manifest.labels
    check_supported(min_confidence, manifest, version.tag)
    data, k, columns, todo = plan(source, output, labels, top_k, use_labels)
    by_key = {data.key(s): s for s in todo}
    journal = Journal(output)
    errors = 0
    readable, missing = [], []  # one stat per image
    for s in todo:
        if s.path.is_file():
            readable.append(str(s.path))
        else:
            missing.append(s)
    if missing:
        rows = [
            make_row(data.key(s), version.name, version.version, None, k, f"no such file: {s.path}", s.label, data.labelled)
            for s in missing
        ]
        journal.append(rows)
        errors += len(rows)
    bar = progress_bar(len(todo), progress)
    bar.update(len(missing))
    started = False
    try:
        if readable:
            started = _connect(ray, address, num_cpus)
            context = ray.data.DataContext.get_current()
            context.execution_options.preserve_order = True
            context.enable_progress_bars = False
            graphs = [v.file for v in manifest.variants.values()]  # the actor picks one
            ood = (manifest.ood.file,) if manifest.ood else ()
            files = {name: (version.path / name).read_bytes() for name in (ONNX_FILE, MANIFEST_FILE, *graphs, *ood)}
            device_for_actor = device if num_gpus > 0 or device == "cpu" else "cpu"
            dataset = ray.data.read_binary_files(readable, include_paths=True)
            scored = dataset.map_batches(
                _RayScorer,
                fn_constructor_kwargs=dict(
                    model_files=ray.put(files), name=version.name, version=version.version, device=device_for_actor,
                    threads=max(1, int(cpus_per_actor)), top_k=k, root=str(data.root), precision=precision,
                    min_confidence=min_confidence,
                ),
                batch_size=batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=max(1, concurrency)),
                num_gpus=num_gpus or None,
                num_cpus=cpus_per_actor,
            )
            for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows = table.to_pylist()
                for row in rows:
                    errors += row["error"] is not None
                    if data.labelled:
                        row["true_label"] = by_key[row["path"]].label
                journal.append(rows)
                bar.update(len(rows))
    finally:
        bar.close()
        if started:
            ray.shutdown()
    seconds = time.perf_counter() - start
    total = journal.finish(columns)
    result = ScoreResult(output, total, len(todo), len(data.samples) - len(todo), errors, seconds)
    if data.labelled:
        attach_report(result, labels, k, version.tag)
    return result

