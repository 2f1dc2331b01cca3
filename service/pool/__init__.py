"""The models one serving worker holds (a registry: no inference, no HTTP here):

- registry.py: `ModelPool`: lookup, lazy loading, one LRU of every loaded version bounded by
  `max_loaded_models` (unload), hot reload, what GET /readyz/models shows;
- metrics.py: Prometheus metrics, one per stage (decode, queue wait, inference), and model loads;
- devices.py: this worker's device (GPU by worker index, or CPU threads).
"""
from service.pool.devices import runtime_options, worker_index
from service.pool.metrics import count_request, metrics, observe
from service.pool.registry import ModelPool

__all__ = ["ModelPool", "count_request", "metrics", "observe", "runtime_options", "worker_index"]
