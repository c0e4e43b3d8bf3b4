"""Prometheus metrics (prefix `accel_`), on a registry per app so several apps can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("accel_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.queue_depth = Gauge("accel_queue_depth", "requests waiting to run", registry=r)
        self.running = Gauge("accel_running", "requests running on the device", registry=r)
        self.batch_size = Histogram("accel_batch_size", "requests per pipeline call", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.queue_seconds = Histogram("accel_queue_seconds", "time from admission to start", buckets=TIME_BUCKETS, registry=r)
        self.run_seconds = Histogram("accel_run_seconds", "pipeline time per batch", ["model"], buckets=TIME_BUCKETS, registry=r)
        self.block_skip_ratio = Histogram("accel_block_skip_ratio", "fraction of block forwards skipped per call",
                                          ["method"], buckets=(0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        self.time_saved = Counter("accel_estimated_time_saved_seconds", "run time saved by skipped blocks (estimate)",
                                  ["method"], registry=r)
        self.errors = Counter("accel_errors", "failed requests by error type", ["type"], registry=r)
        self.model_load_seconds = Gauge("accel_model_load_seconds", "time to load and warm a model", ["model"], registry=r)
        self.estimated_psnr = Histogram(
            "accel_estimated_psnr", "fidelity estimate per accelerated call (dB against the plain output)", ["model"],
            buckets=(20, 25, 30, 32, 34, 36, 38, 40, 45, 50, 60, 100), registry=r)
        self.rejected = Counter("accel_rejected", "requests refused at admission (queue full or draining)", registry=r)
