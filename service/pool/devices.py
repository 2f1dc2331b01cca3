"""Which device this worker runs on: its GPU by BentoML worker index, or CPU threads."""
from __future__ import annotations

import logging

from models.serving.runtime import RuntimeOptions, default_threads

log = logging.getLogger("tuneserve.service")


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
    from models.serving.runtime import cuda_device_count

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
        precision=settings.precision,
        intra_op_threads=threads,
        inter_op_threads=1,
        trt_cache_dir=str(settings.home / "trt-cache") if settings.tensorrt else None,
    )
    log.info(
        "worker %s: %d GPU(s) visible, device=%s device_id=%d, intra-op threads=%d",
        index, gpus, settings.device, device_id, threads,
    )
    return options


def runtime_summary(options: RuntimeOptions, load_errors: dict[str, str]) -> dict:
    """What GET /models shows about this worker's runtime."""
    from models.serving.runtime import cuda_device_count

    return {
        "options": dict(vars(options)),
        "gpus_visible": cuda_device_count(),
        "worker_index": worker_index(),
        "load_errors": dict(load_errors),
    }
