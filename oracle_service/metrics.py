"""Prometheus metrics of an oracle worker.

Most values are read from the label service's own counters at scrape time (no
second bookkeeping); the compute-time histogram is fed by the service's
compute observer, once per backend calculation.

Exported (every series carries ``backend``, the one backend of this worker):

* ``epicycle_oracle_calls_total{backend,outcome}`` — label requests by outcome
  (:data:`oracle_service.core.OUTCOMES`: computed, cached, coalesced, invalid,
  failed, timeout, setup_error, overloaded, cancelled);
* ``epicycle_oracle_compute_seconds{backend,outcome}`` — histogram of the wall
  time of each backend calculation (outcome computed, failed, timeout,
  setup_error, cancelled); ``_sum`` is the busy time, so ``rate(..._sum)`` is the
  number of busy workers;
* ``epicycle_oracle_calculations_cancelled_total{backend}`` — running
  calculations stopped because no caller waited for them any more (every RPC
  waiting for them was cancelled or passed its deadline; pw.x and the
  GPAW/xTB workers are killed, see :mod:`oracle_service.core`);
* ``epicycle_oracle_retries_total{backend}`` — SCF attempts run with escalated
  settings after a failed first attempt (0 for backends without a retry ladder);
* gauges ``epicycle_oracle_in_flight``, ``_queued``, ``_waiting_for_identical``,
  ``_workers``, ``_queue_limit``, ``_cache_entries``, ``_quarantined_structures``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

#: backend wall time, seconds: EMT/LJ take a millisecond, xTB seconds, DFT minutes to an hour
COMPUTE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                   600, 1200, 3600)

#: outcomes of a backend calculation (a subset of the request outcomes)
COMPUTE_OUTCOMES = ("computed", "failed", "timeout", "setup_error", "cancelled")


class OracleMetrics:
    """A collector exporting the label service's statistics, plus the compute-time histogram."""

    def __init__(self, registry: CollectorRegistry, service) -> None:
        self._service = service
        backend = service.oracle.name
        self.compute_seconds = Histogram(
            "epicycle_oracle_compute_seconds",
            "Wall time of each backend calculation, seconds, by outcome "
            "(computed, failed, timeout, setup_error, cancelled).",
            ["backend", "outcome"], buckets=COMPUTE_BUCKETS, registry=registry)
        for outcome in COMPUTE_OUTCOMES:  # every series exists from the start (rates are 0, not absent)
            self.compute_seconds.labels(backend, outcome)
        service.add_compute_observer(self._observe)
        registry.register(self)

    def _observe(self, outcome: str, seconds: float) -> None:
        if outcome not in COMPUTE_OUTCOMES:  # bounded labels, whatever the core reports
            outcome = "failed"
        self.compute_seconds.labels(self._service.oracle.name, outcome).observe(seconds)

    def describe(self):
        return []

    def collect(self):
        stats = self._service.stats()
        oracle = self._service.oracle
        backend = oracle.name
        calls = CounterMetricFamily("epicycle_oracle_calls", "Label requests by backend and outcome.",
                                    labels=["backend", "outcome"])
        for outcome, value in sorted(stats.get("calls", {}).items()):
            calls.add_metric([backend, outcome], value)
        yield calls
        retries = CounterMetricFamily(
            "epicycle_oracle_retries",
            "Backend attempts run with escalated settings after a failed attempt (SCF retry ladder).",
            labels=["backend"])
        retries.add_metric([backend], float(getattr(oracle, "retry_attempts", 0)))
        yield retries
        cancelled = CounterMetricFamily(
            "epicycle_oracle_calculations_cancelled",
            "Running calculations stopped because no caller waited for them any more "
            "(every waiting RPC cancelled or past its deadline).",
            labels=["backend"])
        cancelled.add_metric([backend], float(stats.get("calculations_cancelled", 0)))
        yield cancelled
        for name, key, help_text in (
            ("epicycle_oracle_in_flight", "in_flight", "Calculations running now."),
            ("epicycle_oracle_queued", "queued", "Requests waiting for a worker."),
            ("epicycle_oracle_waiting_for_identical", "waiting_for_identical",
             "Requests waiting for an identical calculation already running."),
            ("epicycle_oracle_workers", "workers", "Concurrent calculations allowed."),
            ("epicycle_oracle_queue_limit", "queue_limit", "Waiting requests allowed before RESOURCE_EXHAUSTED."),
            ("epicycle_oracle_cache_entries", "cache_entries", "Labelled structures held in the cache."),
            ("epicycle_oracle_quarantined_structures", "quarantined",
             "Structures refused after repeated backend failures."),
        ):
            g = GaugeMetricFamily(name, help_text, labels=["backend"])
            g.add_metric([backend], float(stats.get(key, 0)))
            yield g
