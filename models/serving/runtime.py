"""One loaded model version on ONNX Runtime: `load()`, `predict(uint8 batch)`, `ready`.

Providers are chosen TensorRT (opt-in) → CUDA → CPU. onnxruntime-gpu lists CUDA and TensorRT
as available even on a machine without a GPU and then silently runs on CPU, so we check for a
device first and read back what the session really uses.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import EmbeddingUnavailable
from models.artifact.manifest import ONNX_FILE, Manifest, read_manifest
from models.serving.ood import OodModel
from models.artifact.variants import VariantChoice, choose_variant

log = logging.getLogger("tuneserve.runtime")

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"  # auto | cpu | cuda
    device_id: int = 0
    enable_tensorrt: bool = False
    fp16: bool = False  # kept for existing callers: the same as precision="fp16"
    precision: str = "auto"  # auto | fp32 | int8 | fp16: see models.artifact.variants
    intra_op_threads: int = 0  # 0 lets ONNX Runtime decide
    inter_op_threads: int = 1
    trt_cache_dir: str | None = None


    @property
    def requested_precision(self) -> str:
        return "fp16" if self.fp16 and self.precision == "auto" else self.precision


@dataclass
class ProviderPlan:
    providers: list[tuple[str, dict[str, Any]]]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.providers]


def cuda_device_count() -> int:
    """GPUs the CUDA driver can see (0 without a driver); no torch needed."""
    for library in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            driver = ctypes.CDLL(library)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def select_providers(available: list[str], gpu_count: int, options: RuntimeOptions) -> ProviderPlan:
    """Ordered providers for a session, and why each one left out was skipped."""
    plan = ProviderPlan(providers=[])
    want_gpu = options.device in ("auto", "cuda")
    gpu_reason = None
    if not want_gpu:
        gpu_reason = f"device={options.device} requested"
    elif gpu_count == 0:
        gpu_reason = "no CUDA device visible to the driver"
    elif options.device_id >= gpu_count:
        gpu_reason = f"device_id {options.device_id} but only {gpu_count} GPU(s) visible"

    if not options.enable_tensorrt:
        plan.skipped[TENSORRT] = "TensorRT not enabled (TUNESERVE_TENSORRT=1 enables it)"
    elif TENSORRT not in available:
        plan.skipped[TENSORRT] = "not in this onnxruntime build"
    elif gpu_reason:
        plan.skipped[TENSORRT] = gpu_reason
    else:
        trt = {"device_id": options.device_id, "trt_fp16_enable": options.fp16}
        if options.trt_cache_dir:
            trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=options.trt_cache_dir)
        plan.providers.append((TENSORRT, trt))

    if CUDA not in available:
        plan.skipped[CUDA] = "not in this onnxruntime build"
    elif gpu_reason:
        plan.skipped[CUDA] = gpu_reason
    else:
        plan.providers.append((CUDA, {"device_id": options.device_id}))

    if options.device == "cuda" and not plan.providers:
        raise RuntimeError(f"device=cuda requested but unavailable: {plan.skipped}")
    plan.providers.append((CPU, {}))
    return plan


def convert_fp16(path: Path) -> bytes:
    import onnx  # only needed for this opt-in path
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    return model.SerializeToString()


def tensorrt_precision(plan: ProviderPlan, choice: VariantChoice) -> None:
    """TensorRT builds its engine in the precision of the variant served (QDQ → explicit int8)."""
    for name, provider_options in plan.providers:
        if name == TENSORRT:
            provider_options["trt_fp16_enable"] = choice.variant == "fp16"
            provider_options["trt_int8_enable"] = choice.variant == "int8"


class OnnxClassifier:
    """A model version from the store, ready to classify uint8 batches."""

    def __init__(self, directory: str | Path, name: str, version: str, options: RuntimeOptions | None = None):
        self.directory = Path(directory)
        self.name = name
        self.version = version
        self.options = options or RuntimeOptions()
        self.manifest: Manifest = read_manifest(self.directory)
        self.active_providers: list[str] = []
        self.skipped_providers: dict[str, str] = {}
        self.variant = "fp32"  # set by load(): the precision really served
        self.variant_reason = ""
        self._session = None
        self._lock = threading.Lock()
        self.ood: OodModel | None = None  # the in-domain score, for versions exported with one

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def ready(self) -> bool:
        return self._session is not None

    @property
    def on_gpu(self) -> bool:
        return any(p in (CUDA, TENSORRT) for p in self.active_providers)

    def load(self) -> "OnnxClassifier":
        import onnxruntime as ort

        with self._lock:
            if self._session is not None:
                return self
            plan = select_providers(ort.get_available_providers(), cuda_device_count(), self.options)
            settings = ort.SessionOptions()
            settings.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            settings.intra_op_num_threads = self.options.intra_op_threads
            settings.inter_op_num_threads = self.options.inter_op_threads
            settings.log_severity_level = 3
            choice = self.choose_variant(on_gpu=plan.names[0] != CPU)
            tensorrt_precision(plan, choice)
            model = self.directory / choice.file
            graph: bytes | str = convert_fp16(model) if choice.convert_fp16 else str(model)
            session = ort.InferenceSession(graph, sess_options=settings, providers=plan.providers)
            self.variant, self.variant_reason = choice.variant, choice.reason
            self.active_providers = session.get_providers()
            self.skipped_providers = dict(plan.skipped)
            for name in plan.names:
                if name not in self.active_providers:
                    self.skipped_providers[name] = "requested but onnxruntime fell back (missing CUDA/cuDNN libraries?)"
            for name, reason in self.skipped_providers.items():
                log.info("%s: skipped %s: %s", self.tag, name, reason)
            log.info("%s: loaded %s on %s (%s)", self.tag, self.variant, self.active_providers, self.variant_reason)
            self._session = session
            self.ood = self._load_ood()
        return self

    def _load_ood(self) -> OodModel | None:
        section = self.manifest.ood
        if section is None:
            return None
        if not self.has_embedding:
            log.warning("%s: manifest has an ood section but the graph no embedding output; no in-domain score", self.tag)
            return None
        return OodModel.load(self.directory, section.file)

    def choose_variant(self, on_gpu: bool) -> VariantChoice:
        """The precision to serve here; a variant whose file is missing falls back to fp32."""
        choice = choose_variant(self.manifest, self.options.requested_precision, on_gpu)
        if choice.file != ONNX_FILE and not (self.directory / choice.file).is_file():
            return VariantChoice("fp32", ONNX_FILE, f"{choice.variant} chosen ({choice.reason}) but "
                                 f"{choice.file} is missing; serving fp32")
        return choice

    def _check_batch(self, batch: np.ndarray) -> None:
        if self._session is None:
            raise RuntimeError(f"model {self.tag} is not loaded")
        size = self.manifest.preprocessing.size
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
            raise ValueError(f"expected uint8 [N, {size}, {size}, 3], got {batch.dtype} {list(batch.shape)}")

    @property
    def has_embedding(self) -> bool:
        """Whether this version's graph gives its features (exports since the `embedding` output)."""
        name = self.manifest.embedding_output
        if name is None:
            return False
        if self._session is None:
            return True  # the manifest says so; load() checks the graph agrees
        return name in {o.name for o in self._session.get_outputs()}

    def require_embedding(self, feature: str = "this feature") -> str:
        """The embedding output's name, or a clear refusal naming the way out (re-export)."""
        if not self.has_embedding:
            raise EmbeddingUnavailable(
                f"model {self.tag} was exported without an 'embedding' output, so {feature} cannot use it "
                "(it still classifies); fine-tune or re-export it with this tuneserve to add the output")
        return self.manifest.embedding_output

    def require_evidence(self) -> str:
        """The evidence maps' output name (models/serving/evidence.py), or a refusal saying why there are none."""
        from models.serving.evidence import evidence_output

        outputs = None if self._session is None else {o.name for o in self._session.get_outputs()}
        return evidence_output(self.manifest, self.tag, outputs)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """uint8 `[N, H, W, 3]` → the features the head reads, `[N, D]` (float32)."""
        name = self.require_embedding("embed")
        self._check_batch(batch)
        return self._session.run([name], {self.manifest.input_name: batch})[0]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """uint8 `[N, H, W, 3]` → probabilities `[N, C]` (float32)."""
        return self.run(batch, [self.manifest.output_names[1]])[0]

    def predict_scored(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities `[N, C]` and in-domain scores `[N]` (None for versions without OOD data), one pass."""
        if self.ood is None:
            return self.predict(batch), None
        probabilities, embedding = self.run(batch, [self.manifest.output_names[1], self.manifest.embedding_output])
        return probabilities, self.ood.score(embedding)

    def run(self, batch: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        """The named graph outputs for a checked uint8 batch."""
        self._check_batch(batch)
        if self.on_gpu:
            return self._run_io_binding(batch, outputs)
        return self._session.run(outputs, {self.manifest.input_name: batch})

    def _run_io_binding(self, batch: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        # uint8 crosses PCIe (a quarter of float32's bytes); casting happens on the GPU.
        binding = self._session.io_binding()
        binding.bind_cpu_input(self.manifest.input_name, np.ascontiguousarray(batch))
        for name in outputs:
            binding.bind_output(name)
        self._session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def top_k(self, probabilities: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        k = min(k, self.manifest.num_classes)
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        labels = self.manifest.labels
        return [
            [{"label": labels[i], "probability": float(row[i])} for i in indices]
            for row, indices in zip(probabilities, order)
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "version": self.version,
            "variant": self.variant,
            "variant_reason": self.variant_reason,
            "providers": self.active_providers,
            "skipped_providers": self.skipped_providers,
            "options": asdict(self.options),
        }


def default_threads(workers: int) -> int:
    """Intra-op threads per worker so that workers × threads matches the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers))
