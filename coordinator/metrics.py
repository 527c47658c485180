"""Prometheus metrics of the coordinator (on an injected registry).

* ``epicycle_coordinator_oracle_calls_total`` — oracle labels used by the run;
* ``epicycle_coordinator_oracle_failures_total`` — frames no oracle worker could label
  (MD went on one step on the model);
* ``epicycle_coordinator_oracle_failovers_total`` — label requests sent to another worker
  because one was unreachable, overloaded or too slow;
* ``epicycle_coordinator_oracle_call_seconds{outcome}`` — histogram of the time the run
  waited for a label (failovers included), outcome ``ok`` or ``failed``;
* ``epicycle_coordinator_model_update_seconds`` — histogram of one training update
  (AddData, optimisation on schedule, model export);
* ``epicycle_coordinator_updates_total{decision}`` — update decisions, accepted or rejected;
* gauges: simulated time, oracle calls per simulated ps, max σ / threshold, MD
  temperature, threshold, σn, training-set size.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

#: waiting for a label, seconds: an embedded EMT call takes milliseconds, a DFT label up to the 600 s timeout
ORACLE_CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)
#: one training update, seconds
UPDATE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class _PoolCollector:
    """``OraclePool.failovers`` read at scrape time (0 until a pool is watched)."""

    def __init__(self, pool=None) -> None:
        self.pool = pool

    def describe(self):
        return []

    def collect(self):
        c = CounterMetricFamily("epicycle_coordinator_oracle_failovers",
                                "Label requests retried on another oracle worker (unreachable, overloaded, "
                                "deadline exceeded).")
        c.add_metric([], float(getattr(self.pool, "failovers", 0)))
        yield c


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._pool = _PoolCollector()
        registry.register(self._pool)
        self.oracle_calls = Counter("epicycle_coordinator_oracle_calls", "Oracle labels used by the run.",
                                    registry=registry)
        self.oracle_failures = Counter("epicycle_coordinator_oracle_failures",
                                       "Frames the oracle could not label (MD continued one step on the model).",
                                       registry=registry)
        self.oracle_call_seconds = Histogram(
            "epicycle_coordinator_oracle_call_seconds",
            "Time the run waited for one oracle label (failover included), seconds, by outcome (ok, failed).",
            ["outcome"], buckets=ORACLE_CALL_BUCKETS, registry=registry)
        for outcome in ("ok", "failed"):
            self.oracle_call_seconds.labels(outcome)
        self.model_update_seconds = Histogram(
            "epicycle_coordinator_model_update_seconds",
            "One training update of the learner (AddData, optimisation on schedule, export), seconds.",
            buckets=UPDATE_BUCKETS, registry=registry)
        self.simulated_time = Gauge("epicycle_coordinator_simulated_time_femtoseconds",
                                    "Simulated time reached by MD, fs.", registry=registry)
        self.calls_per_ps = Gauge("epicycle_coordinator_oracle_calls_per_simulated_picosecond",
                                  "Oracle calls divided by the simulated time, 1/ps.", registry=registry)
        self.max_sigma_ratio = Gauge("epicycle_coordinator_max_sigma_ratio",
                                     "Largest force σ over the threshold in the last frame (1 = at threshold).",
                                     registry=registry)
        self.temperature = Gauge("epicycle_coordinator_temperature_kelvin", "MD temperature of the last frame, K.",
                                 registry=registry)
        self.threshold = Gauge("epicycle_coordinator_threshold_ev_per_angstrom",
                               "Uncertainty threshold in force, eV/Å.", registry=registry)
        self.noise = Gauge("epicycle_coordinator_noise_ev_per_angstrom", "Learner force noise σn, eV/Å.",
                           registry=registry)
        self.training = Gauge("epicycle_coordinator_training_environments", "Environments in the training set.",
                              registry=registry)
        self.updates = Counter("epicycle_coordinator_updates", "Model updates by decision.", ["decision"],
                               registry=registry)
        for d in ("accepted", "rejected"):
            self.updates.labels(d)
        self._calls = 0
        self._time = 0.0

    def watch_oracle_pool(self, pool) -> None:
        """Export the failover count of this :class:`~coordinator.services.OraclePool`."""
        self._pool.pool = pool

    def resumed(self, oracle_calls: int, time_fs: float) -> None:
        """A resumed run: calls per simulated ps counts the labels written before the interruption too."""
        self._calls = max(self._calls, int(oracle_calls))
        self._set_rate(time_fs)

    def oracle_call(self, time_fs: float) -> None:
        self._calls += 1
        self.oracle_calls.inc()
        self._set_rate(time_fs)

    def oracle_latency(self, seconds: float, ok: bool = True) -> None:
        self.oracle_call_seconds.labels("ok" if ok else "failed").observe(seconds)
        if not ok:
            self.oracle_failures.inc()

    def model_update(self, seconds: float) -> None:
        self.model_update_seconds.observe(seconds)

    def _set_rate(self, time_fs: float) -> None:
        self._time = max(self._time, time_fs)
        if self._time > 0:
            self.calls_per_ps.set(self._calls / (self._time / 1000.0))

    def frame(self, time_fs: float, temperature: float, ratio: float) -> None:
        self.simulated_time.set(time_fs)
        self.temperature.set(temperature)
        self.max_sigma_ratio.set(ratio)
        self._set_rate(time_fs)

    def model(self, info, threshold: float) -> None:
        self.noise.set(info.noise_std)
        self.training.set(info.n_environments)
        self.threshold.set(threshold)

    def update(self, decision) -> None:
        self.updates.labels("accepted" if decision.accept else "rejected").inc()
