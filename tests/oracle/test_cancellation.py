"""A calculation nobody waits for any more is cancelled (issue 12, item 4).

Real oracle servers on 127.0.0.1 and, where the issue is about pw.x, a real pw.x:

* a QE label whose client deadline passes, or whose RPC the client cancels -> the pw.x process is gone within a few seconds
  (SIGTERM, SIGKILL after the grace), the worker serves the next request, nothing is cached or
  quarantined, and ``epicycle_oracle_calculations_cancelled_total`` counts it;
* two identical concurrent requests (single flight), one of which gives up -> the calculation
  goes on for the other, which gets its labels;
* EMT with ``latency_s`` and a short deadline -> the worker is free at once;
* the xTB worker process is killed on cancel and replaced; the core's bookkeeping of waiters
  (cancel only when the last one left; an uninterruptible backend runs to the end and is cached).

pw.x is required (a missing code is a failure with the install hint, as in test_dft_backends).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from ase.build import bulk
from prometheus_client import CollectorRegistry, generate_latest

from oracle_service.backends._subprocess import KILL_GRACE_SECONDS
from oracle_service.base import CalculationCancelled, Labels, Oracle, create_oracle
from oracle_service.core import LabelService, ServiceConfig
from oracle_service.client import OracleClient
from oracle_service.server import OracleServiceConfig, start_oracle_server
from protos import errors

from .test_dft_backends import need_qe

PROPERTIES = ("energy", "forces")


def qe_settings(**extra):
    # the shipped Al pseudopotential (oracle_service/pseudo/generated): no generation in these tests
    settings = dict(ecutwfc=20.0, kspacing=0.8, conv_thr=1e-8, degauss=0.02, generate_pseudopotentials=False,
                    retries=[], quarantine_after=1)
    settings.update(extra)
    return settings


def al4(seed: int):
    atoms = bulk("Al", "fcc", a=4.05, cubic=True)
    atoms.rattle(0.03, seed=seed)
    return atoms


def pw_children() -> list[int]:
    """pids of pw.x processes whose parent is this test process (the in-process server's children)."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == me and comm.startswith("pw.x") and state != "Z":
            found.append(int(entry))
    return found


def wait_until(predicate, timeout: float, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def metric(registry: CollectorRegistry, name: str, backend: str) -> float:
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(f'{name}{{backend="{backend}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exported")


@pytest.fixture(scope="module")
def qe_server():
    need_qe()
    registry = CollectorRegistry()
    config = OracleServiceConfig(backend="qe", settings=qe_settings(), workers=1, queue_limit=4)
    running = start_oracle_server(config, registry=registry)
    running.registry = registry
    yield running
    running.stop(grace=0)


def _gone_or_zombie(pid: int) -> bool:
    """The process no longer runs: no /proc entry, or a zombie.  The entry can vanish between a check
    and the read (its parent reaps it), which is 'gone' too."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_qe_deadline_kills_pw_x_and_frees_the_worker(qe_server) -> None:
    service = qe_server.label_service
    # Al4 takes about a second at the server's settings; Al32 far longer than the 1 s deadline
    slow = al4(1).repeat((2, 2, 2))
    before = service.stats()
    failure: list[BaseException] = []

    def call() -> None:
        with OracleClient(qe_server.address, timeout=30) as client:
            try:
                client.label(slow, PROPERTIES, timeout=1.0)
            except errors.EpicycleError as exc:
                failure.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    assert wait_until(lambda: pw_children(), 5), "pw.x never started"
    running = pw_children()
    thread.join(10)
    deadline_passed = time.monotonic()
    assert not thread.is_alive() and len(failure) == 1 and isinstance(failure[0], errors.CalculationTimeout)
    # gone: SIGTERM at once, SIGKILL after the grace, plus the watcher's poll
    assert wait_until(lambda: not pw_children(), KILL_GRACE_SECONDS + 3), f"pw.x {running} still running"
    assert time.monotonic() - deadline_passed < KILL_GRACE_SECONDS + 3
    for pid in running:
        assert _gone_or_zombie(pid), pid
    assert wait_until(lambda: service.stats()["in_flight"] == 0, 2)
    stats = service.stats()
    assert stats["calculations_cancelled"] == before["calculations_cancelled"] + 1
    assert stats["cache_entries"] == before["cache_entries"]  # nothing cached
    assert stats["quarantined"] == 0 and service.oracle.quarantined() == []  # nor quarantined
    assert stats["calls"]["failed"] == before["calls"]["failed"]
    assert metric(qe_server.registry, "epicycle_oracle_calculations_cancelled_total", "qe") >= 1
    # the one worker is free: a quick request is served at once (a calculation of about a second)
    with OracleClient(qe_server.address, timeout=60) as client:
        started = time.monotonic()
        quick = client.label(al4(2), PROPERTIES, timeout=30)
        assert not quick.cached and np.isfinite(quick.labels.energy)
        assert time.monotonic() - started < 20
    assert not pw_children()


def test_qe_cancelled_rpc_kills_pw_x(qe_server) -> None:
    """The client cancels its call (as a killed coordinator's connection does): pw.x is killed."""
    from protos import wire
    from protos.client import make_channel
    from protos.epicycle.v1 import oracle_pb2, oracle_pb2_grpc

    service = qe_server.label_service
    before = service.stats()["calculations_cancelled"]
    request = oracle_pb2.LabelRequest(properties=list(PROPERTIES))
    wire.structure_to_proto(al4(5).repeat((2, 2, 2)), out=request.structure, velocities=False)
    channel = make_channel(qe_server.address)
    try:
        future = oracle_pb2_grpc.OracleStub(channel).Label.future(request, timeout=60)
        assert wait_until(lambda: pw_children(), 5), "pw.x never started"
        future.cancel()
        cancelled_at = time.monotonic()
        assert wait_until(lambda: not pw_children(), KILL_GRACE_SECONDS + 3), "pw.x still running"
        assert time.monotonic() - cancelled_at < KILL_GRACE_SECONDS + 3
    finally:
        channel.close()
    assert wait_until(lambda: service.stats()["calculations_cancelled"] == before + 1, 2)
    assert service.stats()["in_flight"] == 0


def test_qe_identical_request_keeps_the_calculation_for_the_other_waiter(qe_server) -> None:
    """Single flight: the request that gives up leaves; the other one still gets its labels."""
    service = qe_server.label_service
    # a few seconds of pw.x at the server's settings: Al8 (two cells)
    atoms = al4(3).repeat((2, 1, 1))
    before = service.stats()
    results: dict[str, object] = {}

    def call(name: str, timeout: float) -> None:
        with OracleClient(qe_server.address, timeout=60) as client:
            try:
                results[name] = client.label(atoms, PROPERTIES, timeout=timeout)
            except errors.EpicycleError as exc:
                results[name] = exc

    patient = threading.Thread(target=call, args=("patient", 60.0))
    patient.start()
    assert wait_until(lambda: pw_children(), 5)
    impatient = threading.Thread(target=call, args=("impatient", 0.5))
    impatient.start()
    impatient.join(10)
    assert isinstance(results["impatient"], errors.CalculationTimeout)
    assert pw_children(), "pw.x was killed although a caller still waits for it"
    patient.join(60)
    outcome = results["patient"]
    assert not isinstance(outcome, Exception), outcome
    assert np.isfinite(outcome.labels.energy) and outcome.labels.forces.shape == (8, 3)
    stats = service.stats()
    assert stats["calculations_cancelled"] == before["calculations_cancelled"]
    assert stats["cache_entries"] == before["cache_entries"] + 1
    assert not pw_children()


def test_emt_latency_sleep_ends_when_the_deadline_passes() -> None:
    registry = CollectorRegistry()
    config = OracleServiceConfig(backend="emt", settings={"latency_s": 5}, workers=1, queue_limit=2)
    with start_oracle_server(config, registry=registry) as running:
        service = running.label_service
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
        atoms.rattle(0.05, seed=4)
        with OracleClient(running.address, timeout=30) as client:
            client.wait_ready(10)
            started = time.monotonic()
            with pytest.raises(errors.CalculationTimeout):
                client.label(atoms, PROPERTIES, timeout=0.5)
            # the worker is free right away, not after the 5 s sleep
            assert wait_until(lambda: service.stats()["in_flight"] == 0, 1.0)
            assert time.monotonic() - started < 1.5
            stats = service.stats()
            assert stats["calculations_cancelled"] == 1 and stats["cache_entries"] == 0
            assert metric(registry, "epicycle_oracle_calculations_cancelled_total", "emt") == 1


def test_emt_single_flight_one_waiter_cancels_the_other_gets_the_labels() -> None:
    config = OracleServiceConfig(backend="emt", settings={"latency_s": 1.0}, workers=1, queue_limit=2)
    with start_oracle_server(config) as running:
        service = running.label_service
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
        atoms.rattle(0.05, seed=5)
        results: dict[str, object] = {}

        def call(name: str, timeout: float) -> None:
            with OracleClient(running.address, timeout=30) as client:
                try:
                    results[name] = client.label(atoms, PROPERTIES, timeout=timeout)
                except errors.EpicycleError as exc:
                    results[name] = exc

        leader = threading.Thread(target=call, args=("leader", 0.3))  # runs it, then gives up
        leader.start()
        assert wait_until(lambda: service.stats()["in_flight"] == 1, 2)
        follower = threading.Thread(target=call, args=("follower", 10.0))
        follower.start()
        leader.join(5)
        follower.join(10)
        assert isinstance(results["leader"], errors.CalculationTimeout)
        outcome = results["follower"]
        assert not isinstance(outcome, Exception), outcome
        reference = create_oracle("emt").calculate(atoms, PROPERTIES)
        np.testing.assert_array_equal(outcome.labels.forces, reference.forces)
        stats = service.stats()
        assert stats["calculations_cancelled"] == 0 and stats["cache_entries"] == 1


def test_xtb_worker_process_is_killed_on_cancel_and_replaced() -> None:
    """The persistent-worker backends (xTB here; GPAW runs the same PersistentWorker) kill their
    child on cancel; the next job gets a fresh worker."""
    from .test_dft_backends import need_tblite

    need_tblite()
    oracle = create_oracle("xtb", method="GFN2-xTB", accuracy=0.01, retries=[], quarantine_after=1)
    try:
        small = bulk("Si", "diamond", a=5.43, cubic=True)
        assert np.isfinite(oracle.calculate(small, ("energy",)).energy)  # worker started (imports done)
        worker_pid = oracle._worker._proc.pid
        cancel = threading.Event()
        threading.Timer(0.5, cancel.set).start()
        started = time.monotonic()
        with pytest.raises(CalculationCancelled, match="cancelled"):
            oracle.calculate(bulk("Si", "diamond", a=5.43, cubic=True).repeat((4, 4, 4)), PROPERTIES, cancel=cancel)
        assert time.monotonic() - started < 0.5 + KILL_GRACE_SECONDS + 2
        assert not os.path.exists(f"/proc/{worker_pid}") or \
            open(f"/proc/{worker_pid}/stat").read().split(") ")[1][0] == "Z"
        assert oracle.quarantined() == []  # a cancelled calculation says nothing about the structure
        labels = oracle.calculate(small, ("energy",))
        assert np.isfinite(labels.energy) and labels.info["worker_starts"] == 2
    finally:
        oracle.close()


# ---------------------------------------------------------------------------
# the core's waiter bookkeeping, without gRPC (fast and deterministic)


class HeldOracle(Oracle):
    """Holds each calculation until ``release`` (or ``cancel``) is set; counts what happened."""

    name = "test-held"
    implemented_properties = ("energy",)
    cancellable = True

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self.cancelled = 0
        self.calls = 0

    def calculate(self, atoms, properties, cancel=None):
        self.calls += 1
        self.started.release()
        while not self.release.wait(0.01):
            if cancel is not None and cancel.is_set():
                self.cancelled += 1
                raise CalculationCancelled("held calculation cancelled")
        return Labels(energy=-1.0)


class HeldUninterruptible(HeldOracle):
    name = "test-held-uninterruptible"
    cancellable = False

    def calculate(self, atoms, properties):
        return super().calculate(atoms, properties)


def argon(x: float):
    from ase import Atoms

    return Atoms("Ar2", positions=[[0, 0, 0], [x, 0, 0]], cell=[10, 10, 10], pbc=True)


def test_core_last_waiter_leaving_cancels_and_nothing_is_cached() -> None:
    oracle = HeldOracle()
    service = LabelService(oracle, ServiceConfig(workers=1, poll_seconds=0.005))
    leader_gone, follower_gone = threading.Event(), threading.Event()
    with ThreadPoolExecutor(max_workers=2) as pool:
        leader = pool.submit(service.label, argon(3.8), cancelled=leader_gone.is_set)
        assert oracle.started.acquire(timeout=5)
        follower = pool.submit(service.label, argon(3.8), cancelled=follower_gone.is_set)
        assert wait_until(lambda: service.stats()["waiting_for_identical"] == 1, 5)
        leader_gone.set()
        time.sleep(0.1)
        assert oracle.cancelled == 0  # the follower still waits: the calculation goes on
        follower_gone.set()
        with pytest.raises(errors.CalculationFailed, match="cancelled"):
            follower.result(5)
        with pytest.raises(errors.CalculationFailed, match="cancelled"):
            leader.result(5)
    assert oracle.cancelled == 1
    stats = service.stats()
    assert stats["calculations_cancelled"] == 1 and stats["cache_entries"] == 0 and stats["in_flight"] == 0
    assert stats["quarantined"] == 0 and stats["calls"]["cancelled"] == 2
    oracle.release.set()  # the same structure is calculated again, not refused
    assert not service.label(argon(3.8)).cached and oracle.calls == 2


def test_core_leader_deadline_with_a_follower_still_waiting() -> None:
    oracle = HeldOracle()
    service = LabelService(oracle, ServiceConfig(workers=1, poll_seconds=0.005))
    with ThreadPoolExecutor(max_workers=2) as pool:
        leader = pool.submit(service.label, argon(3.8), timeout=0.2)
        assert oracle.started.acquire(timeout=5)
        follower = pool.submit(service.label, argon(3.8))
        time.sleep(0.4)  # past the leader's deadline
        assert oracle.cancelled == 0
        oracle.release.set()
        with pytest.raises(errors.CalculationTimeout, match="timeout passed while the calculation ran"):
            leader.result(5)
        assert follower.result(5).labels.energy == -1.0
    assert service.stats()["cache_entries"] == 1 and service.stats()["calculations_cancelled"] == 0


def test_core_uninterruptible_backend_runs_to_the_end_and_is_cached() -> None:
    oracle = HeldUninterruptible()
    service = LabelService(oracle, ServiceConfig(workers=1, poll_seconds=0.005))
    with ThreadPoolExecutor(max_workers=1) as pool:
        leader = pool.submit(service.label, argon(3.8), timeout=0.1)
        assert oracle.started.acquire(timeout=5)
        time.sleep(0.3)
        oracle.release.set()
        with pytest.raises(errors.CalculationTimeout):
            leader.result(5)
    assert service.stats()["cache_entries"] == 1 and service.stats()["calculations_cancelled"] == 0
    assert service.label(argon(3.8)).cached


def test_which_backends_get_the_cancel_event() -> None:
    class LegacyEMT(type(create_oracle("emt"))):  # says cancellable, but its calculate takes no cancel
        def calculate(self, atoms, properties):
            return super().calculate(atoms, properties)

    assert LabelService(create_oracle("emt")).describe()["cancellable"]
    assert LabelService(create_oracle("lj")).describe()["cancellable"]
    assert not LabelService(create_oracle("ase", calculator="ase.calculators.emt:EMT")).describe()["cancellable"]
    assert not LabelService(LegacyEMT()).cancellable
    assert LabelService(LegacyEMT()).label(bulk("Cu", "fcc", a=3.61)).labels.energy is not None  # not a TypeError
