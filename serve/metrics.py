"""Prometheus metrics of the server and the proxy (``GET /metrics``, text exposition format).

Each server owns a :class:`prometheus_client.CollectorRegistry` of its own, so several servers in
one process (tests, benchmarks) do not share counters. Names follow Prometheus conventions
(``_total`` counters, ``_seconds`` histograms) under the ``cladapt_`` prefix.
"""

from __future__ import annotations

from typing import Any

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Every metric the server exports."""

    def __init__(self, prefix: str = "cladapt") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self._synced: dict[str, int] = {}
        r = self.registry
        p = prefix
        self.requests = Counter(f"{p}_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter(f"{p}_generation_tokens", "tokens generated", registry=r)
        self.latency = Histogram(
            f"{p}_request_latency_seconds", "admission to last token", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.first_token = Histogram(
            f"{p}_time_to_first_token_seconds", "admission to first streamed token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.routed = Counter(f"{p}_routing_decisions", "requests answered per adapter and how it was chosen",
                              ["adapter", "how"], registry=r)
        self.route_latency = Histogram(
            f"{p}_routing_seconds", "routing time per auto request", buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0),
            registry=r,
        )
        self.cache_hits = Counter(f"{p}_adapter_cache_hits", "adapter cache hits", registry=r)
        self.cache_misses = Counter(f"{p}_adapter_cache_misses", "adapter cache misses (loads)", registry=r)
        self.cache_evictions = Counter(f"{p}_adapter_cache_evictions", "adapters evicted from the cache", registry=r)
        self.adapters_loaded = Gauge(f"{p}_adapters_loaded", "adapters loaded in the serving model", registry=r)
        self.queue_depth = Gauge(f"{p}_queue_depth", "requests admitted and not finished", registry=r)
        self.rejected = Counter(f"{p}_rejected_requests", "requests refused with 503 (queue full)", registry=r)
        self.batch_size = Histogram(f"{p}_batch_size", "rows per decoded batch", buckets=(1, 2, 4, 8, 16, 32, 64),
                                    registry=r)
        self.joined = Counter(f"{p}_joined_requests", "requests that joined a running batch between decoding steps",
                              registry=r)

    def observe(self, name: str, value: float) -> None:
        """The batcher's hook: queue depth, batch sizes, per-request latency, routing time."""
        if name == "queue":
            self.queue_depth.set(value)
        elif name == "batch_size":
            self.batch_size.observe(value)
        elif name == "joined":
            self.joined.inc(value)
        elif name == "route_seconds":
            self.route_latency.observe(value)
        elif name == "latency":
            pass  # recorded per endpoint by the app, which knows the endpoint

    def sync_cache(self, stats: Any, loaded: int) -> None:
        """Copy the cache's own counters (it counts without knowing about Prometheus)."""
        for name, counter in (("hits", self.cache_hits), ("misses", self.cache_misses),
                              ("evictions", self.cache_evictions)):
            value = getattr(stats, name)
            if value > self._synced.get(name, 0):
                counter.inc(value - self._synced.get(name, 0))
                self._synced[name] = value
        self.adapters_loaded.set(loaded)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
