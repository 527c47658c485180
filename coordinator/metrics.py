"""Prometheus metrics of the coordinator (on an injected registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.oracle_calls = Counter("epicycle_coordinator_oracle_calls", "Oracle labels used by the run.",
                                    registry=registry)
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

    def oracle_call(self, time_fs: float) -> None:
        self._calls += 1
        self.oracle_calls.inc()
        self._set_rate(time_fs)

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
