"""The models one serving worker holds, split by job (no HTTP here):

- registry.py: `ModelPool`: lookup, lazy loading, the pinned-version LRU (unload), hot reload;
- batching.py: `Batcher`, per-model micro-batching of ONNX Runtime calls (`Row` per image);
- metrics.py: Prometheus metrics, one per stage (decode, queue wait, inference);
- devices.py: this worker's device (GPU by worker index, or CPU threads).
"""
from service.pool.batching import EXTRAS, Batcher, Row
from service.pool.devices import runtime_options, worker_index
from service.pool.metrics import count_request, metrics, observe
from service.pool.registry import ModelPool

__all__ = ["EXTRAS", "Batcher", "ModelPool", "Row", "count_request", "metrics", "observe", "runtime_options", "worker_index"]
