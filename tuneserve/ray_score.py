"""`tuneserve score --engine ray`: the same scoring pipeline on Ray Data.

`read_binary_files` → `map_batches(_RayScorer)`: each actor holds one ONNX Runtime session
(`models.serving.runtime.OnnxClassifier`), decodes and preprocesses its batch with `models.serving.preprocess`
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
from pathlib import Path
from typing import Any

from tuneserve.score_core import Plan, ScoreResult, columns_for, make_row, prepare_one, relative_key, rows_for, run_engine
from tuneserve.score_output import Journal, _arrow_schema

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

        from models.serving.runtime import OnnxClassifier, RuntimeOptions

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

        from models.serving.preprocess import DEFAULT_MAX_PIXELS

        spec = self.model.manifest.preprocessing
        keys = [relative_key(path, self.root) for path in batch.column("path").to_pylist()]
        prepared = [prepare_one(blob, spec, DEFAULT_MAX_PIXELS) for blob in batch.column("bytes").to_pylist()]
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


class RayEngine:
    """Ray Data over the planned files: one actor pool of `_RayScorer`s; images missing here get error rows."""

    def __init__(self, version, manifest, batch_size: int, concurrency: int, num_gpus: float, cpus_per_actor: float,
                 address: str | None, device: str, precision: str, num_cpus: int | None, min_confidence=None):
        self.version, self.manifest = version, manifest
        self.batch_size, self.concurrency, self.num_gpus, self.cpus_per_actor = batch_size, concurrency, num_gpus, cpus_per_actor
        self.address, self.device, self.precision, self.num_cpus = address, device, precision, num_cpus
        self.min_confidence = min_confidence
        self.tag, self.labels = version.tag, manifest.labels
        self.description = f"ray, {max(1, concurrency)} actors"

    def run(self, plan: Plan, journal: Journal, bar: Any) -> int:
        readable, missing = [], []
        for sample in plan.todo:  # one stat per image
            (readable if sample.path.is_file() else missing).append(sample)
        if missing:
            journal.append([
                make_row(plan.data.key(s), self.version.name, self.version.version, None, plan.k,
                         f"no such file: {s.path}", s.label, plan.data.labelled)
                for s in missing
            ])
            bar.update(len(missing))
        return len(missing) + (self._score_files(plan, readable, journal, bar) if readable else 0)

    def _score_files(self, plan: Plan, samples: list, journal: Journal, bar: Any) -> int:
        ray = import_ray()
        by_key = {plan.data.key(s): s for s in samples}
        started = _connect(ray, self.address, self.num_cpus)
        errors = 0
        try:
            for table in self._scored(ray, plan, [str(s.path) for s in samples]).iter_batches(
                    batch_size=None, batch_format="pyarrow"):
                rows = table.to_pylist()
                for row in rows:
                    errors += row["error"] is not None
                    if plan.data.labelled:
                        row["true_label"] = by_key[row["path"]].label
                journal.append(rows)
                bar.update(len(rows))
        finally:
            if started:
                ray.shutdown()
        return errors

    def _scored(self, ray, plan: Plan, paths: list[str]):
        """The lazy Ray dataset of output rows (model files shipped through the object store)."""
        from models.artifact.manifest import MANIFEST_FILE, ONNX_FILE

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        manifest, version = self.manifest, self.version
        graphs = [v.file for v in manifest.variants.values()]  # the actor picks one
        ood = (manifest.ood.file,) if manifest.ood else ()
        files = {name: (version.path / name).read_bytes() for name in (ONNX_FILE, MANIFEST_FILE, *graphs, *ood)}
        device_for_actor = self.device if self.num_gpus > 0 or self.device == "cpu" else "cpu"
        return ray.data.read_binary_files(paths, include_paths=True).map_batches(
            _RayScorer,
            fn_constructor_kwargs=dict(
                model_files=ray.put(files), name=version.name, version=version.version, device=device_for_actor,
                threads=max(1, int(self.cpus_per_actor)), top_k=plan.k, root=str(plan.data.root),
                precision=self.precision, min_confidence=self.min_confidence,
            ),
            batch_size=self.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=max(1, self.concurrency)),
            num_gpus=self.num_gpus or None,
            num_cpus=self.cpus_per_actor,
        )


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
    from models.artifact import store
    from models.serving.decision import check_supported
    from models.errors import TuneserveError
    from models.artifact.manifest import read_manifest

    import_ray()
    if device == "cuda" and not num_gpus:
        raise TuneserveError("--engine ray --device cuda needs --num-gpus (GPUs per actor, e.g. 1 or 0.5)")
    version = store.resolve(model)
    manifest = read_manifest(version.path)
    check_supported(min_confidence, manifest, version.tag)
    engine = RayEngine(version, manifest, batch_size, concurrency, num_gpus, cpus_per_actor, address, device, precision,
                       num_cpus, min_confidence)
    return run_engine(engine, source, output, top_k, use_labels, progress)
