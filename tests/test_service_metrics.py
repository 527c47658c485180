"""The services' Prometheus metrics after real calls, read back from the /metrics endpoint or the registry.

Covers what the observability issue asks beyond the RPC counters of tests/test_plumbing.py:
oracle compute-time histogram and SCF retries, learner prediction / optimisation / AddData
histograms and log marginal likelihood, coordinator oracle-wait histogram, failures,
failovers, update time and calls per simulated ps.
"""

from __future__ import annotations

import math
import urllib.request

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.metrics import CoordinatorMetrics
from learner_service.client import LearnerClient
from learner_service.server import LearnerServiceConfig, start_learner_server
from oracle_service.backends._scf import ScfOracle
from oracle_service.base import Labels
from oracle_service.client import OracleClient
from oracle_service.core import LabelService
from oracle_service.metrics import COMPUTE_BUCKETS, COMPUTE_OUTCOMES, OracleMetrics
from oracle_service.server import OracleServiceConfig, start_oracle_server
from protos import errors
from protos.errors import CalculationFailed
from protos.server import ServerConfig


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple, float]:
    """``{(sample_name, frozenset(labels)): value}`` from the text exposition format."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(data: dict, sample: str, **labels) -> float | None:
    """The one sample named ``sample`` whose labels include ``labels`` (None if there is none)."""
    found = [v for (n, ls), v in data.items() if n == sample and set(labels.items()) <= ls]
    assert len(found) <= 1, f"{sample}{labels}: {len(found)} samples"
    return found[0] if found else None


def family_types(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def check_histogram(data: dict, name: str, **labels) -> float:
    """Buckets are cumulative and end at +Inf == _count; returns the count."""
    buckets = sorted(((float(dict(ls)["le"]), v) for (n, ls), v in data.items()
                      if n == name + "_bucket" and set(labels.items()) <= ls), key=lambda b: b[0])
    assert buckets and buckets[-1][0] == float("inf"), f"{name}{labels}: no buckets"
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), f"{name}{labels}: buckets not cumulative: {buckets}"
    count = value(data, name + "_count", **labels)
    assert counts[-1] == count
    return count


def cu(seed: int):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.positions += np.random.default_rng(seed).uniform(-0.05, 0.05, size=atoms.positions.shape)
    return atoms


# --------------------------------------------------------------------------- oracle


def test_oracle_compute_histogram_calls_and_gauges_over_grpc() -> None:
    with start_oracle_server(OracleServiceConfig(backend="emt", server=ServerConfig(metrics_port=0))) as running:
        with OracleClient(running.address, timeout=30) as c:
            c.label(cu(1))
            c.label(cu(2))
            c.label(cu(1))  # cached: no second calculation
            bad = cu(3)
            bad.positions[1] = bad.positions[0]  # atoms on top of each other: invalid, never computed
            with pytest.raises(errors.InvalidInput):
                c.label(bad)
        text = scrape(running.metrics_port)
    data = samples(text)
    types = family_types(text)
    assert types["epicycle_oracle_compute_seconds"] == "histogram"
    assert types["epicycle_oracle_retries"] == "counter" and types["epicycle_oracle_calls"] == "counter"
    assert check_histogram(data, "epicycle_oracle_compute_seconds", backend="emt", outcome="computed") == 2
    assert 0 < value(data, "epicycle_oracle_compute_seconds_sum", backend="emt", outcome="computed") < 10
    for outcome in COMPUTE_OUTCOMES[1:]:  # present from the start, at 0
        assert check_histogram(data, "epicycle_oracle_compute_seconds", backend="emt", outcome=outcome) == 0
    les = {float(dict(ls)["le"]) for (n, ls) in data if n == "epicycle_oracle_compute_seconds_bucket"}
    assert les == {*map(float, COMPUTE_BUCKETS), float("inf")}
    assert min(COMPUTE_BUCKETS) <= 0.001 and max(COMPUTE_BUCKETS) >= 3600  # EMT ... an hour of DFT
    assert value(data, "epicycle_oracle_calls_total", backend="emt", outcome="computed") == 2
    assert value(data, "epicycle_oracle_calls_total", backend="emt", outcome="cached") == 1
    assert value(data, "epicycle_oracle_calls_total", backend="emt", outcome="invalid") == 1
    assert value(data, "epicycle_oracle_retries_total", backend="emt") == 0
    for gauge, expected in (("in_flight", 0), ("queued", 0), ("waiting_for_identical", 0), ("workers", 1),
                            ("queue_limit", 16), ("cache_entries", 2), ("quarantined_structures", 0)):
        assert value(data, f"epicycle_oracle_{gauge}", backend="emt") == expected, gauge


class FlakyScf(ScfOracle):
    """An SCF backend that converges only with ``maxstep`` >= ``needed`` (scripted, no real code)."""

    name = "flaky"
    implemented_properties = ("energy", "forces")
    retry_keys = frozenset({"maxstep"})

    def __init__(self, needed: int, **kwargs) -> None:
        self.needed = needed
        super().__init__(**kwargs)

    def calculate_once(self, atoms, properties, overrides):
        if overrides.get("maxstep", 1) < self.needed:
            raise CalculationFailed("SCF did not converge", "log")
        return Labels(energy=-1.0, forces=np.zeros((len(atoms), 3)))


def test_oracle_retries_and_failed_calculations_are_counted() -> None:
    oracle = FlakyScf(needed=50, retries=[{"maxstep": 10}, {"maxstep": 100}], quarantine_after=0)
    service = LabelService(oracle)
    registry = CollectorRegistry()
    OracleMetrics(registry, service)
    service.label(cu(1), ("energy", "forces"))  # attempts 1, 2 fail; 3 converges
    oracle.needed = 1000
    with pytest.raises(CalculationFailed):
        service.label(cu(2), ("energy", "forces"))  # all three attempts fail
    data = samples(generate_latest(registry).decode())
    assert value(data, "epicycle_oracle_retries_total", backend="flaky") == 4
    assert check_histogram(data, "epicycle_oracle_compute_seconds", backend="flaky", outcome="computed") == 1
    assert check_histogram(data, "epicycle_oracle_compute_seconds", backend="flaky", outcome="failed") == 1
    assert value(data, "epicycle_oracle_calls_total", backend="flaky", outcome="failed") == 1


# --------------------------------------------------------------------------- learner


def al32(seed: int):
    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))
    atoms.positions += np.random.default_rng(seed).uniform(-0.1, 0.1, size=atoms.positions.shape)
    return atoms


def emt_forces(atoms):
    a = atoms.copy()
    a.calc = EMT()
    return a.get_potential_energy(), a.get_forces()


def test_learner_prediction_optimisation_and_add_data_metrics_over_grpc() -> None:
    config = LearnerServiceConfig(species=(13,), cutoffs=(5.0, 3.5), server=ServerConfig(metrics_port=0),
                                  hyperparameters={"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05})
    with start_learner_server(config) as running, LearnerClient(running.address, timeout=600) as c:
        c.wait_ready(120)
        before = samples(scrape(running.metrics_port))
        assert value(before, "epicycle_learner_log_marginal_likelihood") is None  # nothing optimised yet
        assert check_histogram(before, "epicycle_learner_prediction_seconds", rpc="Predict") == 0  # no warm-up
        for seed in (1, 2):
            atoms = al32(seed)
            e, f = emt_forces(atoms)
            c.add_data(atoms, forces=f, atom_indices=[0, 5, 10], energy=e)
        result = c.optimize(max_iterations=5)
        c.predict(al32(3))
        c.predict(al32(4), stress=True)
        stream = c.stream()
        try:
            atoms = al32(5)
            stream.predict(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc)
        finally:
            stream.close()
        text = scrape(running.metrics_port)
    data = samples(text)
    types = family_types(text)
    for name in ("epicycle_learner_prediction_seconds", "epicycle_learner_optimization_seconds",
                 "epicycle_learner_add_data_seconds"):
        assert types[name] == "histogram", name
    assert check_histogram(data, "epicycle_learner_prediction_seconds", rpc="Predict") == 2
    assert check_histogram(data, "epicycle_learner_prediction_seconds", rpc="PredictStream") == 1
    assert value(data, "epicycle_learner_prediction_seconds_sum", rpc="Predict") > 0
    assert value(data, "epicycle_learner_predicted_atoms_total", rpc="Predict") == 64
    assert value(data, "epicycle_learner_predicted_atoms_total", rpc="PredictStream") == 32
    assert check_histogram(data, "epicycle_learner_optimization_seconds") == 1
    assert value(data, "epicycle_learner_optimization_seconds_sum") >= 0.9 * result.seconds
    converged = "true" if result.converged else "false"
    assert value(data, "epicycle_learner_optimizations_total", converged=converged) == 1
    assert value(data, "epicycle_learner_optimizations_total",
                 converged={"true": "false", "false": "true"}[converged]) == 0
    assert check_histogram(data, "epicycle_learner_add_data_seconds") == 2
    assert value(data, "epicycle_learner_log_marginal_likelihood") == pytest.approx(result.log_likelihood)
    assert value(data, "epicycle_learner_training_environments") == 6
    assert value(data, "epicycle_learner_model_version") == 4  # 1 + two AddData + one Optimize
    hyps = {dict(ls)["name"] for (n, ls) in data if n == "epicycle_learner_hyperparameter"}
    assert {"sig2", "ls2", "sig3", "ls3", "noise"} <= hyps
    assert value(data, "epicycle_learner_noise_ev_per_angstrom") == pytest.approx(
        value(data, "epicycle_learner_hyperparameter", name="noise"))


def test_learner_bad_prediction_is_not_timed() -> None:
    """Only predictions that ran are observed (a rejected request is an RPC error, counted by the interceptor)."""
    config = LearnerServiceConfig(species=(13,), cutoffs=(5.0, 3.5), warm_up=False, server=ServerConfig())
    with start_learner_server(config) as running, LearnerClient(running.address, timeout=600) as c:
        atoms = al32(1)
        atoms.positions[0, 0] = float("nan")
        with pytest.raises(errors.InvalidInput):
            c.predict(atoms)
        data = samples(generate_latest(running.registry).decode())
    assert check_histogram(data, "epicycle_learner_prediction_seconds", rpc="Predict") == 0
    assert value(data, "epicycle_grpc_server_handled_total", grpc_method="Predict",
                 grpc_code="INVALID_ARGUMENT") == 1


# --------------------------------------------------------------------------- coordinator


class _Pool:
    failovers = 0


class _Info:
    noise_std = 0.05
    n_environments = 7


class _Decision:
    def __init__(self, accept: bool) -> None:
        self.accept = accept


def test_coordinator_metrics() -> None:
    registry = CollectorRegistry()
    m = CoordinatorMetrics(registry)
    data = samples(generate_latest(registry).decode())
    assert value(data, "epicycle_coordinator_oracle_failovers_total") == 0  # before a pool is attached
    pool = _Pool()
    m.watch_oracle_pool(pool)
    pool.failovers = 3
    m.walkers(["T300", "T900"])
    m.oracle_latency(0.02)
    m.oracle_call("T300", 0.0)
    m.oracle_latency(4.0)
    m.oracle_call("T900", 500.0)
    m.oracle_latency(650.0, ok=False)
    m.model_update(0.3)
    m.frame("T300", 400.0, 310.0, 0.8)
    m.frame("T900", 600.0, 920.0, 1.3)
    m.queue(3, 2)
    m.skipped_frame("deduplicated")
    m.model(_Info(), 0.05)
    m.update(_Decision(True))
    m.update(_Decision(False))
    m.timestep("T900", 5.0)
    m.rollback("T300", "retry", 2.5)
    m.rollback("T300", "rejected", 5.0)
    m.rollback("T300", "retry", 2.5)
    text = generate_latest(registry).decode()
    data = samples(text)
    types = family_types(text)
    assert types["epicycle_coordinator_oracle_call_seconds"] == "histogram"
    assert types["epicycle_coordinator_model_update_seconds"] == "histogram"
    assert value(data, "epicycle_coordinator_oracle_failovers_total") == 3
    assert check_histogram(data, "epicycle_coordinator_oracle_call_seconds", outcome="ok") == 2
    assert value(data, "epicycle_coordinator_oracle_call_seconds_bucket", outcome="ok", le="5.0") == 2
    assert value(data, "epicycle_coordinator_oracle_call_seconds_bucket", outcome="ok", le="0.025") == 1
    assert check_histogram(data, "epicycle_coordinator_oracle_call_seconds", outcome="failed") == 1
    assert value(data, "epicycle_coordinator_oracle_failures_total") == 1
    assert value(data, "epicycle_coordinator_oracle_calls_total", walker="T300") == 1
    assert value(data, "epicycle_coordinator_oracle_calls_total", walker="T900") == 1
    # calls per ps of simulated time summed over the walkers: 2 calls in 0.4 + 0.6 ps
    assert value(data, "epicycle_coordinator_oracle_calls_per_simulated_picosecond") == pytest.approx(2.0)
    assert check_histogram(data, "epicycle_coordinator_model_update_seconds") == 1
    assert value(data, "epicycle_coordinator_max_sigma_ratio", walker="T300") == 0.8
    assert value(data, "epicycle_coordinator_temperature_kelvin", walker="T900") == 920.0
    assert value(data, "epicycle_coordinator_labels_queued") == 3
    assert value(data, "epicycle_coordinator_labels_in_flight") == 2
    assert value(data, "epicycle_coordinator_frames_not_labelled_total", reason="deduplicated") == 1
    assert value(data, "epicycle_coordinator_frames_not_labelled_total", reason="dropped") == 0
    assert value(data, "epicycle_coordinator_training_environments") == 7
    assert value(data, "epicycle_coordinator_updates_total", decision="accepted") == 1
    assert value(data, "epicycle_coordinator_updates_total", decision="rejected") == 1
    assert value(data, "epicycle_rollbacks_total", walker="T300", outcome="retry") == 2
    assert value(data, "epicycle_rollbacks_total", walker="T300", outcome="rejected") == 1
    assert value(data, "epicycle_rollbacks_total", walker="T900", outcome="retry") == 0  # exists from the start
    assert value(data, "epicycle_timestep_fs", walker="T300") == 2.5
    assert value(data, "epicycle_timestep_fs", walker="T900") == 5.0


def test_coordinator_calls_per_ps_counts_labels_from_before_a_resume() -> None:
    m = CoordinatorMetrics(CollectorRegistry())
    m.resumed(10, 2000.0)
    m.oracle_call("w0", 2500.0)
    assert m.calls_per_ps._value.get() == pytest.approx(11 / 2.5)
    assert m.oracle_calls.labels("w0")._value.get() == 1  # a counter of this process: restarts at 0


def test_cycle_times_oracle_calls_and_counts_failures(tmp_path) -> None:
    """A real in-process run reports every label's wait to the metrics; a label that fails (an outage past
    oracle.outage_timeout_s) is counted as a failure before the run stops."""
    import yaml

    from coordinator.config import parse_config
    from coordinator.cycle import OnTheFlyRun, Progress, RunStopped, run_species
    from coordinator.rundir import RunDirectory
    from coordinator.services import OracleUnavailable, start_services

    config = parse_config({"seed": 1, "structure": {"rattle": 0.02}, "oracle": {"workers": 2, "outage_timeout_s": 0},
                           "learner": {"cutoffs": [5.0, 3.5], "optimize": {"every": 0}},
                           "sampler": {"temperature_K": 900.0, "steps": 300, "frame_interval": 10},
                           "walkers": {"temperatures": [900, 1200]}, "stop": {"max_labels": 3}})
    registry = CollectorRegistry()
    metrics = CoordinatorMetrics(registry)
    rd = RunDirectory.create(tmp_path / "run", yaml.safe_dump(config.to_dict()))
    services = start_services(config, run_species(config), learner_dir=rd.path / "learner")
    try:
        run = OnTheFlyRun(config, rd, services, Progress(300, 5.0, quiet=True), metrics)
        state = run.run()
        assert state.oracle_calls == 3
        data = samples(generate_latest(registry).decode())
        assert check_histogram(data, "epicycle_coordinator_oracle_call_seconds", outcome="ok") == 3
        assert sum(value(data, "epicycle_coordinator_oracle_calls_total", walker=w) for w in ("T900", "T1200")) == 3
        # the next label request finds every worker gone
        entry = rd.read_queue_entry(state.label_seqs[-1], archived=True)
        run.in_flight[99] = entry
        with pytest.raises(RunStopped, match="unreachable"):
            run._on_label(99, None, 0.25, OracleUnavailable("no oracle worker could label the structure"))
    finally:
        services.close()
        rd.close()
    data = samples(generate_latest(registry).decode())
    assert check_histogram(data, "epicycle_coordinator_oracle_call_seconds", outcome="failed") == 1
    assert value(data, "epicycle_coordinator_oracle_failures_total") == 1


# --------------------------------------------------------------------------- sampler


class _UncertainAfter:
    """EMT forces; σ above any threshold from call ``n`` on (so the sampler stops on uncertainty)."""

    def __init__(self, n: int) -> None:
        from sampler_service.force_providers import AseCalculatorProvider

        self.base = AseCalculatorProvider(EMT())
        self.n, self.calls = n, 0

    def compute(self, *args):
        from dataclasses import replace

        self.calls += 1
        result = self.base.compute(*args)
        sigma = 10.0 if self.calls > self.n else 0.0
        return replace(result, force_std=np.full_like(result.forces, sigma))


def _run_request(max_steps: int, frame_interval: int, threshold: float = 0.0, learner: str = ""):
    from protos import wire
    from protos.epicycle.v1 import sampler_pb2
    from sampler_service.remote import md_settings

    req = sampler_pb2.RunRequest(learner_address=learner)
    wire.structure_to_proto(al32(1), out=req.new_run.structure)
    req.new_run.settings.CopyFrom(md_settings(engine="builtin", ensemble="nve", timestep_fs=2.0, temperature_K=300.0,
                                              initial_temperature_K=300.0, seed=1))
    req.control.max_steps = max_steps
    req.control.frame_interval = frame_interval
    req.control.sigma_threshold = threshold
    return req


def test_sampler_steps_temperature_drift_and_throughput() -> None:
    from sampler_service.client import SamplerClient
    from sampler_service.server import SamplerServiceConfig, default_provider_factory, start_sampler_server

    def factory(address, want_stress):
        return _UncertainAfter(12) if address == "uncertain" else default_provider_factory(address, want_stress)

    config = SamplerServiceConfig(default_learner="oracle:emt", engines=("builtin",),
                                  server=ServerConfig(metrics_port=0))
    with start_sampler_server(config, provider_factory=factory) as running, \
            SamplerClient(running.address, timeout=60) as client:
        before = samples(scrape(running.metrics_port))
        assert math.isnan(value(before, "epicycle_sampler_temperature_kelvin"))  # nothing integrated yet
        frames = []
        result = client.run(_run_request(30, 5), on_frame=frames.append)
        data = samples(scrape(running.metrics_port))
        assert value(data, "epicycle_sampler_steps_total") == 30
        assert value(data, "epicycle_sampler_temperature_kelvin") == pytest.approx(result.stop.frame.temperature_k)
        assert math.isfinite(value(data, "epicycle_sampler_energy_drift_ev_per_atom_ps"))
        assert value(data, "epicycle_sampler_energy_drift_ev_per_atom_ps") == pytest.approx(
            result.stop.energy_drift_ev_per_atom_ps)
        assert value(data, "epicycle_sampler_steps_per_second") > 0
        assert value(data, "epicycle_sampler_active_runs") == 0
        # an uncertainty stop: its frame is not integrated, the gauge keeps the last integrated temperature
        result = client.run(_run_request(100, 1, threshold=1.0, learner="uncertain"))
        from protos.epicycle.v1 import sampler_pb2

        assert result.stop.reason == sampler_pb2.STOP_REASON_UNCERTAIN and result.stop.steps_taken < 100
        assert not result.stop.frame.temperature_k  # the stop frame itself carries no temperature
        data = samples(scrape(running.metrics_port))
        assert value(data, "epicycle_sampler_steps_total") == 30 + result.stop.steps_taken
        temperature = value(data, "epicycle_sampler_temperature_kelvin")
        assert math.isfinite(temperature) and temperature > 0
