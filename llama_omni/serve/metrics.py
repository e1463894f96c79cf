"""Request counters and latency percentiles for the /metrics endpoint."""

from __future__ import annotations

import threading
from collections import Counter, deque

import numpy as np

LATENCIES = ("first_text_ms", "first_audio_ms", "total_ms")


class Metrics:
    """Counts by name and the last `window` values of each latency, thread-safe."""

    def __init__(self, window: int = 2000):
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.samples = {name: deque(maxlen=window) for name in LATENCIES}

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def observe(self, name: str, value: float | None) -> None:
        if value is not None:
            with self._lock:
                self.samples[name].append(float(value))

    def snapshot(self) -> dict:
        with self._lock:
            counts = dict(sorted(self.counts.items()))
            samples = {name: np.array(values) for name, values in self.samples.items()}
        return {
            "counts": counts,
            "latency_ms": {name: percentiles(v) for name, v in samples.items()},
        }


def percentiles(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"n": 0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "n": int(values.size),
        "p50": round(float(p50), 1),
        "p90": round(float(p90), 1),
        "p99": round(float(p99), 1),
        "max": round(float(values.max()), 1),
    }
