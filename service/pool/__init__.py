"""The models one serving worker holds, split by job (no HTTP here):

- registry.py: `ModelPool`: lookup, lazy loading, the pinned-version LRU, hot reload, decode;
- batching.py: `Batcher`, per-model micro-batching of ONNX Runtime calls;
- metrics.py: Prometheus metrics, one per stage (decode, queue wait, inference);
- devices.py: this worker's device (GPU by worker index, or CPU threads).
"""
from service.pool.batching import Batcher
from service.pool.devices import runtime_options, worker_index
from service.pool.metrics import count_request, metrics
from service.pool.registry import ModelPool

__all__ = ["Batcher", "ModelPool", "count_request", "metrics", "runtime_options", "worker_index"]
