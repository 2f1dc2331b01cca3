"""The frozen forward pass every `auto` job starts with: multi-depth features (and the trunk cache
of a partial fine-tune) for every train and val image, in one pass, in bounded memory.

- **On ONNX Runtime on CPU.** The tap (normalisation, the stages, pooling and the trunk's output) is
  exported once and run by ORT: measured on EfficientNet-Lite0 at 96 px on these 2 cores, 2.1 ms per
  image against torch's 9.2 (depthwise convolutions are where torch's CPU kernels are slow). On a
  GPU, or where the export fails, torch runs it (the log says which).
- **Into one preallocated array, float16 when large.** 60,000 images × 10,320 features are 1.2 GB in
  float16 against 2.5 GB in float32 plus the copy a concatenation of batches makes; heads compute in
  float32 from it, a chunk at a time (training/streaming.py). Problems small enough to fit in memory
  (`streams` false) stay float32: an untrained backbone's embedding can sit below float16's
  smallest value (about 6e-8) and would become a constant column.
- The pass reports `stage` events (images done, its own ETA), and the torch forward's cost per image
  is timed on two batches beside it: fine-tune budgets are planned from what training will run.
"""
from __future__ import annotations

import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from training.multidepth import pool_stages
from training.progress import Progress

log = logging.getLogger("tuneserve.training")

FLOAT16_LIMIT = 6.0e4  # float16's largest finite value is 65,504
REPORT_EVERY_S = 5.0  # stage events at most this often (the job's status and the CLI's line read them)
TIMED_BATCHES = 2  # torch batches timed beside an ORT pass, for the fine-tune estimates


class Tap(nn.Module):
    """uint8 NHWC images → (multi-depth features, the trunk's output when a trunk is cached)."""

    def __init__(self, normalise: Callable[[torch.Tensor], torch.Tensor], stages: nn.Module, trunk_index: int | None):
        super().__init__()
        self.normalise_fn = (normalise,)  # a bound method of the model: not registered as a module
        self.stages = stages
        self.trunk_index = trunk_index

    def forward(self, image: torch.Tensor):
        maps, embedding = self.stages(self.normalise_fn[0](image))
        features = pool_stages(maps, embedding)
        return features if self.trunk_index is None else (features, maps[self.trunk_index])


def trunk_index(stages: nn.Module, last_frozen: nn.Module | None) -> int | None:
    """Which of the tap's maps is the frozen trunk's output (the module a partial fine-tune starts after)."""
    if last_frozen is None:
        return None
    net = stages.net
    modules = list(net._blocks) if hasattr(net, "_blocks") else list(net.features)
    return next((i for i, module in enumerate(modules) if module is last_frozen), None)


@dataclass
class Pass:
    features: np.ndarray  # [N, D] float16, train rows then val rows
    targets: np.ndarray  # [N] int64
    trunk: torch.Tensor | None  # [N, ...] the trunk's output (float16 when large), or None
    seconds: float
    engine: str  # "onnxruntime" or "torch"


def ort_runner(tap: Tap, example: torch.Tensor) -> Callable[[np.ndarray], list[np.ndarray]] | None:
    """The tap exported and loaded on ONNX Runtime's CPU provider, or None (logged) when that fails."""
    try:
        import onnxruntime as ort

        outputs = ["features"] + (["trunk"] if tap.trunk_index is not None else [])
        with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's tracer notes: shapes are fixed but the batch
            path = Path(scratch) / "tap.onnx"
            torch.onnx.export(tap.eval(), (example,), str(path), input_names=["image"], output_names=outputs,
                              dynamic_axes={"image": {0: "n"}}, opset_version=17, dynamo=False)
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.log_severity_level = 3
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda images: session.run(None, {"image": images})
    except Exception as error:  # noqa: BLE001 - any export or load failure falls back to torch
        log.info("feature pass: ONNX Runtime unavailable for this tap (%s: %s); torch runs it",
                 type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "")
        return None


def torch_runner(tap: Tap, device: torch.device) -> Callable[[np.ndarray], list[np.ndarray]]:
    @torch.no_grad()
    def run(images: np.ndarray) -> list[np.ndarray]:
        tap.to(device).eval()  # a no-op after the first batch; a GPU pass hands the model back to the CPU after
        out = tap(torch.from_numpy(images).to(device))
        return [t.float().cpu().numpy() for t in (out if isinstance(out, tuple) else (out,))]

    return run


@torch.no_grad()
def torch_seconds_per_image(tap: Tap, batches: list[torch.Tensor], device: torch.device) -> float:
    """The torch forward's cost per image on a few batches (what a fine-tune's estimate needs)."""
    tap.eval()
    tap(batches[0][:2].to(device))  # warm-up: first-call allocations are not per-image cost
    started, images = time.monotonic(), 0
    for x in batches:
        tap(x.to(device))
        images += len(x)
    return (time.monotonic() - started) / max(images, 1)


@dataclass
class Runner:
    """The tap ready to run batches: `run(uint8 NHWC array) → [features, (trunk)]`, on `engine`."""

    run: Callable[[np.ndarray], list[np.ndarray]]
    engine: str
    tap: Tap
    device: torch.device


def make_runner(tap: Tap, example: torch.Tensor, device: torch.device, use_ort: bool = True) -> Runner:
    """ONNX Runtime on a CPU (where it is faster), else torch on `device`."""
    run = ort_runner(tap, example[:2]) if use_ort and device.type == "cpu" else None
    if run is not None:
        return Runner(run, "onnxruntime", tap, device)
    return Runner(torch_runner(tap, device), "torch", tap, device)


def feature_pass(runner: Runner, batches, total: int, progress: Progress | None = None, stop=None,
                 stage: str = "features") -> Pass:
    """Every image of `batches` ((uint8 NHWC, targets) pairs) through the tap, in order, into one array."""
    from models.errors import Cancelled

    features, targets, trunk, row = None, np.zeros(total, np.int64), None, 0
    started = last_report = time.monotonic()
    for x, y in batches:
        if stop is not None and stop.is_set():
            raise Cancelled("cancelled while computing features")
        out = runner.run(np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x))
        if features is None:
            features = np.empty((total, out[0].shape[1]), feature_dtype(total, out[0].shape[1]))
            trunk = np.empty((total, *out[1].shape[1:]), _trunk_dtype(total, out[1])) if len(out) > 1 else None
        features = widened(features, out[0])
        features[row:row + len(x)] = out[0]
        if trunk is not None:
            trunk = widened(trunk, out[1])
            trunk[row:row + len(x)] = out[1]
        targets[row:row + len(x)] = np.asarray(y)
        row += len(x)
        last_report = _report(progress, stage, row, total, started, last_report)
    if runner.engine == "torch":
        runner.tap.cpu()  # the cheap candidates and the export share these modules and expect them on the CPU
    seconds = time.monotonic() - started
    log.info("%s pass: %d images on %s in %.0fs (%.2f ms per image)", stage, row, runner.engine, seconds,
             1000 * seconds / max(row, 1))
    return Pass(features[:row], targets[:row], None if trunk is None else torch.from_numpy(trunk[:row]), seconds,
                runner.engine)


def feature_dtype(rows: int, cols: int):
    """float16 only where the heads stream (training/streaming.py): there memory decides."""
    from training.streaming import streams

    return np.float16 if streams(rows, cols) else np.float32


def widened(buffer: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`buffer` as float32 once `values` would overflow float16 (65,504): an untrained or unusual backbone's
    activations can, and an inf column makes every head NaN. Pretrained ones stay far below it."""
    if buffer.dtype != np.float16 or not values.size or float(np.abs(values).max()) < FLOAT16_LIMIT:
        return buffer
    log.warning("features exceed float16's range (%.3g): kept in float32", float(np.abs(values).max()))
    return buffer.astype(np.float32)


def torch_cost(runner: Runner, pass_: Pass, batches) -> float:
    """Seconds per image of the torch forward (what fine-tunes run): the pass's own where torch ran it,
    else timed on TIMED_BATCHES batches."""
    if runner.engine == "torch":
        return pass_.seconds / max(len(pass_.targets), 1)
    timed = [x for (x, _), _ in zip(batches, range(TIMED_BATCHES))]
    return torch_seconds_per_image(runner.tap, timed, runner.device)


def _trunk_dtype(total: int, batch: np.ndarray) -> type:
    """float16 when the whole cache in float32 would pass training/trunk.py's limit (the tail computes in float32)."""
    from training.trunk import CACHE_BYTES_FP32

    return np.float16 if total * batch[0].size * 4 > CACHE_BYTES_FP32 else np.float32


def _report(progress: Progress | None, stage: str, done: int, total: int, started: float, last: float) -> float:
    now = time.monotonic()
    if progress is None or (now - last < REPORT_EVERY_S and done < total):
        return last
    rate = (now - started) / max(done, 1)
    progress.stage(stage, done, total, eta_s=round(rate * (total - done), 1), unit="images")
    return now
