"""Prometheus metrics of the coordinator (on an injected registry).

* ``epicycle_coordinator_oracle_calls_total{walker}`` — oracle labels used by the run;
* ``epicycle_coordinator_oracle_failures_total`` — label requests that failed (retried during
  an outage, or the run stopped / the frame was skipped);
* ``epicycle_coordinator_labels_queued`` / ``_labels_in_flight`` — uncertain frames waiting for an
  oracle slot / label requests sent and not answered: the real demand on the oracle pool
  (what the KEDA trigger scales oracle workers on);
* ``epicycle_coordinator_frames_not_labelled_total{reason}`` — uncertain frames that got no label:
  ``deduplicated`` (covered by labels in flight), ``dropped`` (certain under a newer model),
  ``skipped`` (the oracle failed and ``oracle.on_failure: skip``);
* ``epicycle_coordinator_oracle_failovers_total`` — label requests sent to another worker
  because one was unreachable, overloaded or too slow;
* ``epicycle_coordinator_oracle_call_seconds{outcome}`` — histogram of the time the run
  waited for a label (failovers included), outcome ``ok`` or ``failed``;
* ``epicycle_coordinator_model_update_seconds`` — histogram of one training update
  (AddData, optimisation on schedule, model export);
* ``epicycle_coordinator_updates_total{decision}`` — update decisions, accepted or rejected;
* gauges: simulated time, max σ / threshold and MD temperature per ``walker``; oracle calls per
  simulated ps, threshold, σn, training-set size.

The ``walker`` label takes one value per walker of the run (at most ``config.MAX_WALKERS``).
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
        self.oracle_calls = Counter("epicycle_coordinator_oracle_calls", "Oracle labels used by the run, by walker.",
                                    ["walker"], registry=registry)
        self.oracle_failures = Counter("epicycle_coordinator_oracle_failures",
                                       "Label requests that failed (retried in an outage, or the run stopped / the "
                                       "frame was skipped).", registry=registry)
        self.labels_queued = Gauge("epicycle_coordinator_labels_queued",
                                   "Uncertain frames waiting for an oracle slot.", registry=registry)
        self.labels_in_flight = Gauge("epicycle_coordinator_labels_in_flight",
                                      "Label requests sent to the oracle pool and not answered yet.", registry=registry)
        self.not_labelled = Counter("epicycle_coordinator_frames_not_labelled",
                                    "Uncertain frames that got no label, by reason (deduplicated, dropped, skipped).",
                                    ["reason"], registry=registry)
        for reason in ("deduplicated", "dropped", "skipped"):
            self.not_labelled.labels(reason)
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
                                    "Simulated time reached by MD, fs, by walker.", ["walker"], registry=registry)
        self.calls_per_ps = Gauge("epicycle_coordinator_oracle_calls_per_simulated_picosecond",
                                  "Oracle calls divided by the simulated time, 1/ps.", registry=registry)
        self.max_sigma_ratio = Gauge("epicycle_coordinator_max_sigma_ratio",
                                     "Largest force σ over the threshold in the walker's last frame (1 = at "
                                     "threshold).", ["walker"], registry=registry)
        self.temperature = Gauge("epicycle_coordinator_temperature_kelvin",
                                 "MD temperature of the walker's last frame, K.", ["walker"], registry=registry)
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
        # policy.update: trial
        self.rollbacks = Counter("epicycle_rollbacks", "Failed trials of a new model version, by walker and "
                                 "outcome (retry: rolled back with a smaller Δt; rejected: the walker stays on its "
                                 "previous version).", ["walker", "outcome"], registry=registry)
        self.timestep_fs = Gauge("epicycle_timestep_fs", "MD time step in force, fs.", ["walker"], registry=registry)
        # calibration of σ at the oracle calls (coordinator/calibration.py)
        self.calibration_scale = Gauge("epicycle_calibration_scale",
                                       "Fitted s of σ_cal = s·σ_epistemic at the oracle calls (1: calibrated).",
                                       registry=registry)
        self.calibration_z2 = Gauge("epicycle_calibration_mean_squared_z",
                                    "Mean z² of the force residuals at the oracle calls (ideal 1), by σ used.",
                                    ["sigma"], registry=registry)
        self.calibration_coverage = Gauge("epicycle_calibration_coverage_ratio",
                                          "Fraction of force residuals within kσ at the oracle calls, by σ used.",
                                          ["sigma", "interval"], registry=registry)
        self.calibration_scale.set(1.0)
        self._calls = 0
        self._time = 0.0
        self._walker_time: dict[str, float] = {}

    def walkers(self, names) -> None:
        """Create every walker's series (so they exist from the start, at 0)."""
        for name in names:
            self.oracle_calls.labels(name)
            self.simulated_time.labels(name)
            self.max_sigma_ratio.labels(name)
            self.temperature.labels(name)
            self.rollbacks.labels(name, "retry")
            self.rollbacks.labels(name, "rejected")

    def queue(self, queued: int, in_flight: int) -> None:
        self.labels_queued.set(queued)
        self.labels_in_flight.set(in_flight)

    def skipped_frame(self, reason: str) -> None:
        self.not_labelled.labels(reason).inc()

    def watch_oracle_pool(self, pool) -> None:
        """Export the failover count of this :class:`~coordinator.services.OraclePool`."""
        self._pool.pool = pool

    def resumed(self, oracle_calls: int, time_fs: float) -> None:
        """A resumed run: calls per simulated ps counts the labels written before the interruption too."""
        self._calls = max(self._calls, int(oracle_calls))
        self._set_rate(time_fs)

    def oracle_call(self, walker: str, time_fs: float) -> None:
        self._calls += 1
        self.oracle_calls.labels(walker).inc()
        self._walker_time[walker] = max(self._walker_time.get(walker, 0.0), time_fs)
        self._set_rate(sum(self._walker_time.values()))

    def oracle_latency(self, seconds: float, ok: bool = True) -> None:
        self.oracle_call_seconds.labels("ok" if ok else "failed").observe(seconds)
        if not ok:
            self.oracle_failures.inc()

    def model_update(self, seconds: float) -> None:
        self.model_update_seconds.observe(seconds)

    def _set_rate(self, time_fs: float) -> None:
        """Calls per ps of simulated time summed over the walkers."""
        self._time = max(self._time, time_fs)
        if self._time > 0:
            self.calls_per_ps.set(self._calls / (self._time / 1000.0))

    def frame(self, walker: str, time_fs: float, temperature: float, ratio: float) -> None:
        self.simulated_time.labels(walker).set(time_fs)
        self.temperature.labels(walker).set(temperature)
        self.max_sigma_ratio.labels(walker).set(ratio)
        self._walker_time[walker] = time_fs
        self._set_rate(sum(self._walker_time.values()))

    def model(self, info, threshold: float) -> None:
        self.noise.set(info.noise_std)
        self.training.set(info.n_environments)
        self.threshold.set(threshold)

    def calibration(self, out: dict) -> None:
        self.calibration_scale.set(out["scale"])
        for which in ("raw", "scaled"):
            self.calibration_z2.labels(which).set(out[which]["mean_squared_z"])
            self.calibration_coverage.labels(which, "1sigma").set(out[which]["within_1_sigma"])
            self.calibration_coverage.labels(which, "2sigma").set(out[which]["within_2_sigma"])

    def rollback(self, walker: str, outcome: str, timestep_fs: float) -> None:
        self.rollbacks.labels(walker, outcome).inc()
        self.timestep_fs.labels(walker).set(timestep_fs)

    def timestep(self, walker: str, timestep_fs: float) -> None:
        self.timestep_fs.labels(walker).set(timestep_fs)

    def update(self, decision) -> None:
        self.updates.labels("accepted" if decision.accept else "rejected").inc()
