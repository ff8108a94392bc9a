"""The pool's own Prometheus metrics (namespaced ``rollout_pool_*``), optionally served over HTTP.

One registry per pool, so several pools in one process (tests, a trainer with two) never collide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class EngineSeries:
    latency: Any
    output_tokens: Any
    ok: Any
    error: Any


class PoolMetrics:
    def __init__(self, port: int | None = None, host: str = "127.0.0.1"):
        self.registry = CollectorRegistry()
        r = self.registry
        self.inflight = Gauge("rollout_pool_inflight_samples", "Samples in flight per engine", ["engine"], registry=r)
        self.cap = Gauge("rollout_pool_cap_samples", "Current in-flight cap per engine", ["engine"], registry=r)
        self.queued = Gauge("rollout_pool_queued_samples", "Samples waiting in the pool for capacity", registry=r)
        self.healthy = Gauge("rollout_pool_engine_healthy", "1 while the engine is in rotation", ["engine"],
                             registry=r)
        self.kv_usage = Gauge("rollout_pool_engine_kv_usage", "Engine KV-cache usage (0-1)", ["engine"], registry=r)
        self.preemptions = Gauge("rollout_pool_engine_preemptions", "Engine preemptions so far", ["engine"],
                                 registry=r)
        self.tokens_per_s = Gauge("rollout_pool_engine_tokens_per_second", "Output tokens/s over the last interval",
                                  ["engine"], registry=r)
        self.output_tokens = Counter("rollout_pool_output_tokens", "Output tokens returned", ["engine"], registry=r)
        self.results = Counter("rollout_pool_results", "Requests resolved", ["engine", "outcome"], registry=r)
        self.latency = Histogram("rollout_pool_call_latency_seconds", "Latency of one HTTP call", ["engine"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.cap_changes = Counter("rollout_pool_cap_changes", "Controller cap changes", ["engine", "direction"],
                                   registry=r)
        self._series: dict[str, EngineSeries] = {}
        if port is not None:
            start_http_server(port, addr=host, registry=r)
            log.info("pool metrics on http://%s:%d/metrics", host, port)

    def series(self, engine: str) -> EngineSeries:
        """One engine's per-result series, looked up once (``labels()`` costs more than the increment)."""
        cached = self._series.get(engine)
        if cached is None:
            cached = self._series[engine] = EngineSeries(
                self.latency.labels(engine), self.output_tokens.labels(engine),
                self.results.labels(engine, "ok"), self.results.labels(engine, "error"))
        return cached

    def text(self) -> str:
        return generate_latest(self.registry).decode()
