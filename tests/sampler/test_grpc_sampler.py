"""The Sampler service over real gRPC on 127.0.0.1: errors, streaming, a real learner, override
forces, cancellation, Describe."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

from learner_service.client import LearnerClient
from learner_service.datasets import perturbed_fcc_al
from learner_service.server import LearnerServiceConfig, start_learner_server
from protos import wire
from protos.epicycle.v1 import sampler_pb2, sampler_pb2_grpc
from protos.errors import CalculationTimeout, InvalidInput
from protos.server import ServerConfig
from sampler_service import dynamics as dyn
from sampler_service.client import SamplerClient
from sampler_service.force_providers import AseCalculatorProvider
from sampler_service.remote import frame_from_proto, md_settings
from sampler_service.server import SamplerServiceConfig, default_provider_factory, start_sampler_server
from sampler_service.settings import ENSEMBLES

HYPS = {"sig2": 0.2, "ls2": 0.9, "sig3": 0.02, "ls3": 0.75, "noise": 0.04}


def al32() -> Atoms:
    return bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))


def emt(atoms: Atoms):
    a = atoms.copy()
    a.calc = EMT()
    return a.get_potential_energy(), a.get_forces()


def arr(msg) -> np.ndarray:
    return wire.decode_array(msg, "test")


def new_run(atoms: Atoms | None = None, max_steps: int = 5, frame_interval: int = 0, threshold: float = 0.0,
            learner: str = "", **settings) -> sampler_pb2.RunRequest:
    req = sampler_pb2.RunRequest(learner_address=learner)
    wire.structure_to_proto(al32() if atoms is None else atoms, out=req.new_run.structure)
    settings.setdefault("engine", "builtin")
    req.new_run.settings.CopyFrom(md_settings(**settings))
    req.control.max_steps = max_steps
    req.control.frame_interval = frame_interval
    req.control.sigma_threshold = threshold
    return req


class CountingProvider:
    """EMT forces, a little slower than EMT, counting calls (to see whether an engine still runs)."""

    def __init__(self, delay: float = 0.005) -> None:
        self.base = AseCalculatorProvider(EMT())
        self.delay = delay
        self.calls = 0

    def compute(self, *args):
        self.calls += 1
        time.sleep(self.delay)
        return self.base.compute(*args)


@pytest.fixture(scope="module")
def counting():
    return CountingProvider()


@pytest.fixture(scope="module")
def sampler(counting):
    """A builtin-only sampler whose default learner is EMT in-process; "counting" gives CountingProvider,
    any other address the default factory (a real learner stream)."""

    def factory(address, want_stress):
        return counting if address == "counting" else default_provider_factory(address, want_stress)

    running = start_sampler_server(SamplerServiceConfig(default_learner="oracle:emt", engines=("builtin",),
                                                        server=ServerConfig(max_workers=4)),
                                   provider_factory=factory)
    client = SamplerClient(running.address, timeout=60)
    client.wait_ready(10)
    yield running, client
    client.close()
    running.stop(0)


@pytest.fixture(scope="module")
def learner():
    """A real Learner service with a small GP trained on EMT-labelled perturbed FCC Al (8 environments)."""
    running = start_learner_server(LearnerServiceConfig(species=(13,), cutoffs=(6.0, 4.0), hyperparameters=HYPS))
    client = LearnerClient(running.address)
    client.wait_ready(120)
    for frame in perturbed_fcc_al(2, seed=5):
        client.add_data(frame, forces=frame.get_forces(), atom_indices=[0, 9, 18, 27])
    yield running, client
    client.close()
    running.stop(0)


# -- bad requests ----------------------------------------------------------------------------


def _nan_structure():
    atoms = al32()
    atoms.positions[3, 1] = np.nan
    return new_run(atoms)


def _garbage_checkpoint():
    return sampler_pb2.RunRequest(checkpoint=b"PK\x03\x04 certainly not a checkpoint")


@pytest.mark.parametrize("make_request, words", [
    (lambda: new_run(ensemble="nvt_nose"), ["ensemble", "nvt_nose"]),
    (lambda: new_run(timestep_fs=0.0), ["timestep_fs"]),
    (lambda: new_run(timestep_fs=-2.0), ["timestep_fs"]),
    (lambda: new_run(temperature_K=-5.0), ["temperature_K"]),
    (lambda: new_run(ensemble="nvt_langevin", friction=-1.0), ["friction"]),
    (lambda: new_run(schedule=((10.0, -1.0),)), ["schedule"]),
    (_nan_structure, ["NaN"]),
    (lambda: sampler_pb2.RunRequest(checkpoint=b""), ["checkpoint is empty"]),
    (_garbage_checkpoint, ["checkpoint"]),
    (lambda: new_run(engine="lammps"), ["lammps", "not available", "builtin"]),
    (lambda: new_run(engine="gromacs"), ["gromacs"]),
    (lambda: sampler_pb2.RunRequest(), ["new_run", "checkpoint"]),
])
def test_bad_requests_are_invalid_argument_naming_the_setting(sampler, make_request, words):
    running, _ = sampler
    stub = sampler_pb2_grpc.SamplerStub(grpc.insecure_channel(running.address))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Run(make_request(), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in info.value.details()
    assert "Traceback" not in info.value.details()


def test_bad_control_and_override_forces_after_a_valid_start(sampler):
    _, client = sampler
    stop = client.run(new_run(max_steps=2)).stop
    req = sampler_pb2.RunRequest(checkpoint=stop.checkpoint)
    req.control.max_steps = 1
    req.control.timestep_fs = -0.5
    with pytest.raises(InvalidInput, match="timestep_fs") as info:
        client.run(req)
    assert info.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidInput, match="override_forces.forces.*shape"):
        client.resume(stop.checkpoint, max_steps=1, forces=np.zeros((31, 3)))
    with pytest.raises(InvalidInput, match="override_forces.forces.*non-finite"):
        client.resume(stop.checkpoint, max_steps=1, forces=np.full((32, 3), np.nan))
    req = sampler_pb2.RunRequest(checkpoint=stop.checkpoint)
    req.control.sigma_threshold = float("nan")
    with pytest.raises(InvalidInput, match="sigma_threshold"):
        client.run(req)


# -- streaming -------------------------------------------------------------------------------


def test_frames_every_k_steps_then_the_stop_report(sampler):
    _, client = sampler
    result = client.run(new_run(max_steps=10, frame_interval=3, initial_temperature_K=300.0, seed=2))
    assert [f.step for f in result.frames] == [0, 3, 6, 9]
    stop = result.stop
    assert stop.reason == sampler_pb2.STOP_REASON_MAX_STEPS
    assert stop.step == 10 and stop.steps_taken == 10 and stop.time_fs == pytest.approx(10.0)
    assert stop.frame.step == 9  # the last integrated frame, always in the report
    assert stop.frame.SerializeToString() == result.frames[-1].SerializeToString()
    # the state where the checkpoint resumes is x_10, not the frame's x_9
    assert arr(stop.state.positions).shape == (32, 3)
    assert not np.allclose(arr(stop.state.positions), arr(stop.frame.structure.positions))
    assert arr(stop.images).shape == (32, 3) and stop.settings.engine == "builtin"
    assert stop.settings.seed == 2 and stop.settings.timestep_fs == 1.0
    f = frame_from_proto(result.frames[1])
    assert f.observables.temperature_K > 0 and f.velocities.shape == (32, 3) and f.model_version == 0
    assert stop.checkpoint and stop.steps_per_second > 0 and np.isfinite(stop.energy_drift_ev_per_atom_ps)
    # only the stop frame when frame_interval = 0; resuming continues the step count; Δt can change
    req = sampler_pb2.RunRequest(checkpoint=stop.checkpoint)
    req.control.max_steps = 4
    req.control.timestep_fs = 0.5
    again = client.run(req)
    assert again.frames == [] and again.stop.frame.step == 13 and again.stop.step == 14
    assert again.stop.time_fs == pytest.approx(12.0) and again.stop.settings.timestep_fs == 0.5


def test_override_forces_integrate_that_step(sampler):
    _, client = sampler
    first = client.run(new_run(max_steps=5, frame_interval=1, initial_temperature_K=500.0, seed=4,
                               timestep_fs=2.0))
    prev = frame_from_proto(first.frames[-1])  # frame 4
    rng = np.random.default_rng(0)
    f_dft = rng.normal(0.0, 0.5, (32, 3))
    after = client.resume(first.stop.checkpoint, max_steps=2, frame_interval=1, forces=f_dft, energy=-1.0)
    fk, fk1 = (frame_from_proto(f) for f in after.frames)
    assert fk.step == 5 and fk.forces_supplied and not fk1.forces_supplied and fk.model_version == -1
    np.testing.assert_array_equal(fk.forces, f_dft)
    assert fk.energy == -1.0
    np.testing.assert_array_equal(fk.positions, arr(first.stop.state.positions))
    m = fk.masses[:, None]
    dt = 2.0
    v_k = prev.velocities + 0.5 * dt * (prev.forces + f_dft) / m * dyn.ACCEL
    np.testing.assert_allclose(fk.velocities, v_k, rtol=0, atol=1e-10)
    x_next = fk.positions + dt * v_k + 0.5 * dt * dt * f_dft / m * dyn.ACCEL
    d = fk1.positions - x_next
    frac = np.linalg.solve(fk1.cell.T, d.T).T
    np.testing.assert_allclose((frac - np.round(frac)) @ fk1.cell, 0.0, atol=1e-10)
    # EMT's own step would have gone elsewhere
    plain = client.resume(first.stop.checkpoint, max_steps=2, frame_interval=1)
    assert np.max(np.abs(frame_from_proto(plain.frames[1]).positions - fk1.positions)) > 1e-4


# -- a real learner --------------------------------------------------------------------------


def test_threshold_stop_with_forces_and_sigma_from_a_real_learner(sampler, learner):
    _, client = sampler
    lrunning, lclient = learner
    noise = HYPS["noise"]
    threshold = 2.0 * noise
    version = lclient.info().model_version
    result = client.run(new_run(max_steps=200, frame_interval=1, threshold=threshold, learner=lrunning.address,
                                initial_temperature_K=900.0, seed=3, timestep_fs=2.0))
    stop = result.stop
    assert stop.reason == sampler_pb2.STOP_REASON_UNCERTAIN
    k = stop.step
    assert 1 <= k < 200 and stop.steps_taken == k and len(result.frames) == k
    assert [f.step for f in result.frames] == list(range(k))
    for f in result.frames:  # every streamed frame was below the threshold and came from the GP
        assert arr(f.prediction.atom_std).max() <= threshold
        assert f.prediction.model_version == version and f.prediction.noise_std == pytest.approx(noise)
    frame = frame_from_proto(stop.frame)
    assert frame.step == k and frame.velocities is None
    # the learner sends the rotation-invariant per-atom σ: the stop names atoms (component -1)
    comps = np.array([(u.atom, u.component) for u in stop.uncertain])
    sig = np.array([u.sigma for u in stop.uncertain])
    assert len(comps) > 0 and np.all(sig > threshold) and np.all(comps[:, 1] == -1)
    np.testing.assert_array_equal(comps[:, 0], np.flatnonzero(frame.atom_std > threshold))
    np.testing.assert_array_equal(sig, frame.atom_std[frame.atom_std > threshold])
    assert stop.max_sigma == frame.atom_std.max() and stop.threshold == threshold
    assert np.all(frame.atom_std >= frame.force_std.max(axis=1) * (1 - 1e-12))
    # the σ is the learner's: an independent unary Predict of the stop configuration agrees
    atoms = Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
    p = lclient.predict(atoms)
    np.testing.assert_allclose(frame.force_std, p.force_std, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(frame.atom_std, p.atom_std, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(frame.forces, p.forces, rtol=1e-9, atol=1e-12)
    # the oracle labels that frame; the sampler integrates the step with them and goes on
    energy, forces = emt(atoms)
    after = client.resume(stop.checkpoint, max_steps=3, frame_interval=1, learner=lrunning.address,
                          forces=forces, energy=energy)
    fk = frame_from_proto(after.frames[0])
    assert fk.step == k and fk.forces_supplied
    np.testing.assert_array_equal(fk.forces, forces)
    assert after.stop.step == k + 3 and not after.frames[1].forces_from_override


# -- cancellation ----------------------------------------------------------------------------


def _wait_idle(running, timeout=10.0):
    deadline = time.monotonic() + timeout
    while running.servicer.active_runs and time.monotonic() < deadline:
        time.sleep(0.02)
    return running.servicer.active_runs == 0


def test_client_cancellation_stops_the_engine(sampler, counting):
    running, client = sampler
    cancelled_before = running.servicer.runs_cancelled_total
    call = client.open_run(new_run(max_steps=10**7, frame_interval=1, learner="counting"))
    steps = []
    for reply in call:
        steps.append(reply.frame.step)
        if len(steps) == 3:
            call.cancel()
    assert call.cancelled and steps[:3] == [0, 1, 2]
    assert _wait_idle(running), "the engine kept running after the client cancelled"
    calls = counting.calls
    time.sleep(0.3)
    assert counting.calls == calls  # no more force calls
    assert calls < 100  # stopped within a few steps, not after the queue of 64 frames filled up
    assert running.servicer.runs_cancelled_total == cancelled_before + 1


@pytest.mark.parametrize("frame_interval", [1, 0])  # 0: no frames, the engine runs on the RPC's own thread
def test_deadline_stops_the_engine(sampler, counting, frame_interval):
    running, client = sampler
    with pytest.raises(CalculationTimeout):
        client.run(new_run(max_steps=10**7, frame_interval=frame_interval, learner="counting"), timeout=0.5)
    assert _wait_idle(running)
    calls = counting.calls
    time.sleep(0.3)
    assert counting.calls == calls


def test_cancelling_a_call_without_frames_stops_the_engine(sampler, counting):
    running, client = sampler
    cancelled_before = running.servicer.runs_cancelled_total
    call = client.open_run(new_run(max_steps=10**7, frame_interval=0, learner="counting"))
    threading.Timer(0.3, call.cancel).start()
    assert list(call) == [] and call.cancelled
    assert _wait_idle(running), "the engine kept running after the client cancelled"
    calls = counting.calls
    time.sleep(0.3)
    assert counting.calls == calls
    assert running.servicer.runs_cancelled_total == cancelled_before + 1


def test_a_slow_consumer_cancelling_from_another_thread(sampler, counting):
    """Cancelling while the server is blocked on a full frame queue (the client stopped reading)."""
    running, client = sampler
    call = client.open_run(new_run(max_steps=10**7, frame_interval=1, learner="counting"))
    first = next(iter(call))
    assert first.frame.step == 0
    time.sleep(0.8)  # the server fills its queue and the gRPC window, then waits
    threading.Timer(0.05, call.cancel).start()
    time.sleep(0.2)
    assert _wait_idle(running)


# -- Describe --------------------------------------------------------------------------------


def test_describe(sampler):
    _, client = sampler
    d = client.describe()
    assert list(d.engines) == ["builtin"] and list(d.ensembles) == list(ENSEMBLES)
    assert d.default_learner == "oracle:emt"


# -- metrics -----------------------------------------------------------------------------------


class GatedProvider:
    """EMT forces; the call for step ``at`` waits until the test has looked (to scrape mid-run)."""

    def __init__(self, at: int) -> None:
        self.base = AseCalculatorProvider(EMT())
        self.at, self.calls = at, 0
        self.reached, self.release = threading.Event(), threading.Event()

    def compute(self, *args):
        if self.calls == self.at:
            self.reached.set()
            assert self.release.wait(30), "the test never released the gate"
        self.calls += 1
        return self.base.compute(*args)


def _steps_total(port: int) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = [s.value for fam in text_string_to_metric_families(text) for s in fam.samples
             if s.name == "epicycle_sampler_steps_total"]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("engine", ["builtin", "lammps"])
def test_steps_counter_advances_during_a_run(engine):
    """Scraped over HTTP while the engine waits inside step 20: the 20 integrated steps are counted."""
    gate = GatedProvider(at=20)
    running = start_sampler_server(
        SamplerServiceConfig(engines=("builtin", "lammps"), server=ServerConfig(max_workers=4, metrics_port=0)),
        provider_factory=lambda address, want_stress: gate)
    client = SamplerClient(running.address, timeout=60)
    frames, result = [], {}
    try:
        assert _steps_total(running.metrics_port) == 0
        req = new_run(max_steps=50, frame_interval=5, learner="gated", engine=engine, initial_temperature_K=300.0)
        caller = threading.Thread(target=lambda: result.update(r=client.run(req, on_frame=frames.append)))
        caller.start()
        assert gate.reached.wait(60)
        time.sleep(0.2)  # frames 0..15 have had time to reach the client
        assert _steps_total(running.metrics_port) == 20
        assert [f.step for f in frames] == [0, 5, 10, 15]
        gate.release.set()
        caller.join(60)
        assert result["r"].stop.steps_taken == 50
        assert _steps_total(running.metrics_port) == 50
    finally:
        gate.release.set()
        client.close()
        running.stop(0)


def test_sampler_dials_only_the_learners_it_was_started_with():
    """A client cannot make the sampler connect to an address of its choosing, nor start an in-process oracle
    (``oracle:qe`` would run pw.x in the sampler); the operator allows addresses at start."""
    running = start_sampler_server(SamplerServiceConfig(default_learner="127.0.0.1:9", engines=("builtin",),
                                                        allowed_learners=("oracle:emt",)))
    client = SamplerClient(running.address, timeout=60)
    try:
        for address in ("127.0.0.1:22", "oracle:qe", "10.0.0.1:50052"):
            with pytest.raises(InvalidInput, match=f"learner_address '{address}' is not one this sampler may use"):
                client.run(new_run(max_steps=2, learner=address))
        result = client.run(new_run(max_steps=3, learner="oracle:emt"))  # listed by the operator
        assert result.stop.reason == sampler_pb2.STOP_REASON_MAX_STEPS and result.stop.step == 3
    finally:
        client.close()
        running.stop(0)
