"""The loop's view of the service settings (service/config.py holds each setting and its help)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIB = 1024 * 1024


@dataclass(frozen=True)
class LoopSettings:
    max_records: int = 100_000
    capture_models: tuple[str, ...] = ()
    capture_fraction: float = 0.05
    capture_max_bytes: int = 1024 * MIB
    capture_max_items: int = 10_000
    capture_max_age_seconds: float = 7 * 86400.0
    capture_min_free_bytes: int = 256 * MIB
    drift_fraction: float = 0.25
    drift_window: int = 200
    drift_max_samples: int = 2000
    drift_interval_s: float = 30.0
    drift_alpha: float = 0.01
    drift_permutations: int = 200
    refresh_s: float = 1.0
    flush_s: float = 0.2
    queue_size: int = 10_000
    auto_promote: bool = False
    auto_promote_min_feedback: int = 100
    auto_promote_margin: float = 0.0

    @property
    def feedback_wait_s(self) -> float:
        """How long POST /feedback re-reads the database for a record another worker has not written
        yet: a little over two flush intervals, so an unknown id still answers 404 within a second."""
        return 2 * self.flush_s + 0.5

    @classmethod
    def of(cls, settings: Any) -> "LoopSettings":
        """From service settings: every `loop_*`, `capture_*`, `drift_*` and `auto_promote*` field there is."""
        get = lambda name, default: getattr(settings, name, default)  # noqa: E731
        d = cls()
        return cls(
            max_records=get("loop_max_records", d.max_records),
            capture_models=tuple(get("capture_models", d.capture_models)),
            capture_fraction=get("capture_fraction", d.capture_fraction),
            capture_max_bytes=int(get("capture_max_mb", d.capture_max_bytes / MIB) * MIB),
            capture_max_items=get("capture_max_items", d.capture_max_items),
            capture_max_age_seconds=get("capture_max_age_hours", d.capture_max_age_seconds / 3600) * 3600,
            capture_min_free_bytes=int(get("capture_min_free_mb", d.capture_min_free_bytes / MIB) * MIB),
            drift_fraction=get("drift_fraction", d.drift_fraction),
            drift_window=get("drift_window", d.drift_window),
            drift_max_samples=get("drift_max_samples", d.drift_max_samples),
            drift_interval_s=get("drift_interval_s", d.drift_interval_s),
            drift_alpha=get("drift_alpha", d.drift_alpha),
            refresh_s=get("loop_refresh_s", d.refresh_s),
            auto_promote=get("auto_promote", d.auto_promote),
            auto_promote_min_feedback=get("auto_promote_min_feedback", d.auto_promote_min_feedback),
            auto_promote_margin=get("auto_promote_margin", d.auto_promote_margin),
        )
