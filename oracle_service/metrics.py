"""Prometheus metrics of an oracle worker, read from the core's counters at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class OracleMetrics:
    """A collector exporting the label service's own statistics (no second bookkeeping)."""

    def __init__(self, registry: CollectorRegistry, service) -> None:
        self._service = service
        registry.register(self)

    def describe(self):
        return []

    def collect(self):
        stats = self._service.stats()
        backend = self._service.oracle.name
        calls = CounterMetricFamily("epicycle_oracle_calls", "Label requests by backend and outcome.",
                                    labels=["backend", "outcome"])
        for outcome, value in sorted(stats.get("calls", {}).items()):
            calls.add_metric([backend, outcome], value)
        yield calls
        seconds = CounterMetricFamily("epicycle_oracle_compute_seconds",
                                      "Wall time spent in backend calculations, seconds.", labels=["backend"])
        seconds.add_metric([backend], float(stats.get("compute_seconds_total", 0.0)))
        yield seconds
        for name, key, help_text in (
            ("epicycle_oracle_in_flight", "in_flight", "Calculations running now."),
            ("epicycle_oracle_queued", "queued", "Requests waiting for a worker."),
            ("epicycle_oracle_workers", "workers", "Concurrent calculations allowed."),
            ("epicycle_oracle_queue_limit", "queue_limit", "Waiting requests allowed before RESOURCE_EXHAUSTED."),
            ("epicycle_oracle_cache_entries", "cache_entries", "Labelled structures held in the cache."),
        ):
            g = GaugeMetricFamily(name, help_text, labels=["backend"])
            g.add_metric([backend], float(stats.get(key, 0)))
            yield g
