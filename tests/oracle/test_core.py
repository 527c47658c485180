"""The labelling core: cache, single flight, bounded concurrency, error handling.

The backends here are small real :class:`Oracle` subclasses (counting,
blocking on an event, failing on purpose), not mocks.  Waits are bounded
(``wait_until``) but nothing asserts on wall-clock durations.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from oracle_service.backends.analytic import LennardJonesOracle
from oracle_service.base import Labels, Oracle, create_oracle, register_backend
from oracle_service.core import (
    OUTCOMES,
    LabelService,
    ServiceConfig,
    backend_identity,
    check_labels,
    content_hash,
)
from oracle_service.validation import Limits
from protos.errors import (
    CalculationFailed,
    CalculationTimeout,
    InvalidInput,
    Overloaded,
    SetupError,
)

WAIT = 20.0  # s, upper bound for any wait in these tests (never reached when things work)


def wait_until(predicate, timeout: float = WAIT) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()


def argon(seed: int, n_cells: int = 1) -> Atoms:
    """Rattled fcc argon, 4·n_cells³ atoms; different seeds give different structures."""
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(n_cells)
    atoms.positions += np.random.default_rng(seed).normal(0.0, 0.05, atoms.positions.shape)
    return atoms


# ---------------------------------------------------------------------------
# test backends (real Oracle subclasses)


@register_backend("test-counting")
class CountingOracle(Oracle):
    """Lennard-Jones that counts its calls."""

    name = "test-counting"
    implemented_properties = ("energy", "forces", "stress")

    def __init__(self, **lj_settings) -> None:
        self.inner = LennardJonesOracle(**lj_settings)
        self.calls = 0
        self._lock = threading.Lock()

    def settings(self):
        return self.inner.settings()

    def calculate(self, atoms, properties):
        with self._lock:
            self.calls += 1
        return self.inner.calculate(atoms, properties)


class BlockingOracle(Oracle):
    """Blocks every calculation until ``release`` is set."""

    name = "test-blocking"
    implemented_properties = ("energy", "forces")

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()

    def calculate(self, atoms, properties):
        with self._lock:
            self.calls += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            assert self.release.wait(WAIT), "the test never released the backend"
            return Labels(energy=-1.0 * len(atoms), forces=np.zeros((len(atoms), 3)))
        finally:
            with self._lock:
                self.running -= 1


class MisbehavingOracle(Oracle):
    """Fails in the way ``mode`` says."""

    name = "test-misbehaving"
    implemented_properties = ("energy", "forces", "stress")

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.calls = 0

    def calculate(self, atoms, properties):
        self.calls += 1
        n = len(atoms)
        good = {"energy": -1.0, "forces": np.zeros((n, 3)), "stress": np.zeros(6)}
        if self.mode == "crash":
            raise RuntimeError("SCF exploded\nTraceback (most recent call last):\n  File 'pw.x'")
        if self.mode == "key-error":
            return {}["energy"]
        if self.mode == "setup":
            raise SetupError("pw.x not found on PATH")
        if self.mode == "timeout":
            raise CalculationTimeout("pw.x exceeded its 3600 s wall-time limit")
        if self.mode == "nan-forces":
            good["forces"][2, 1] = np.nan
        if self.mode == "inf-energy":
            good["energy"] = np.inf
        if self.mode == "nan-stress":
            good["stress"][4] = np.nan
        if self.mode == "wrong-shape":
            good["forces"] = np.zeros((n + 1, 3))
        if self.mode == "missing":
            good["forces"] = None
        if self.mode == "not-labels":
            return good
        return Labels(**good)


class SerialOracle(CountingOracle):
    name = "test-serial"
    thread_safe = False


# ---------------------------------------------------------------------------
# hashing


def test_hash_ignores_dtype_layout_and_negative_zero():
    atoms = argon(1)
    identity = backend_identity(LennardJonesOracle())
    reference = content_hash(atoms, ("energy",), identity)
    same = Atoms(
        numbers=atoms.numbers.astype(np.int32),
        positions=np.asfortranarray(atoms.positions),
        cell=atoms.cell.array.copy(),
        pbc=atoms.pbc,
    )
    assert content_hash(same, ("energy",), identity) == reference
    zero = Atoms("Ar", positions=[[0.0, 1.0, 2.0]], cell=[5, 5, 5], pbc=True)
    minus_zero = Atoms("Ar", positions=[[-0.0, 1.0, 2.0]], cell=[5, 5, 5], pbc=True)
    assert content_hash(zero, ("energy",), identity) == content_hash(minus_zero, ("energy",), identity)
    atoms.set_velocities(np.ones((len(atoms), 3)))  # velocities do not change labels
    assert content_hash(atoms, ("energy",), identity) == reference


@pytest.mark.parametrize(
    "change",
    ["position", "number", "cell", "pbc", "properties", "settings", "magmoms"],
)
def test_hash_changes_with_anything_that_changes_labels(change):
    atoms = argon(1)
    identity = backend_identity(LennardJonesOracle())
    props = ("energy",)
    reference = content_hash(atoms, props, identity)
    if change == "position":
        atoms.positions[2, 0] += 1e-12
    elif change == "number":
        atoms.numbers[0] = 36
    elif change == "cell":
        atoms.cell[0, 0] += 1e-9
    elif change == "pbc":
        atoms.pbc = [True, True, False]
    elif change == "properties":
        props = ("energy", "forces")
    elif change == "settings":
        identity = backend_identity(LennardJonesOracle(epsilon=0.0105))
    elif change == "magmoms":
        atoms.set_initial_magnetic_moments([1.0, 0.0, 0.0, 0.0])
    assert content_hash(atoms, props, identity) != reference


# ---------------------------------------------------------------------------
# cache


def test_identical_structure_is_computed_once():
    oracle = CountingOracle()
    service = LabelService(oracle)
    first = service.label(argon(1), ["energy", "forces"])
    second = service.label(argon(1), ["forces", "energy"])  # same set, other order
    assert oracle.calls == 1
    assert not first.cached and second.cached and not second.coalesced
    assert second.structure_hash == first.structure_hash
    assert second.labels.energy == first.labels.energy
    np.testing.assert_array_equal(second.labels.forces, first.labels.forces)
    assert second.seconds == first.seconds  # the original calculation's time
    stats = service.stats()
    assert stats["cache_hits"] == 1 and stats["calls"]["computed"] == 1 and stats["calls"]["cached"] == 1


def test_labels_contain_exactly_the_requested_properties():
    service = LabelService(CountingOracle())
    outcome = service.label(argon(1), ["forces"])
    assert outcome.labels.properties() == ("forces",)
    assert outcome.labels.info["backend"] == "test-counting"
    assert outcome.labels.info["structure_hash"] == outcome.structure_hash
    assert service.label(argon(1), "forces").cached  # a bare string is one property
    full = service.label(argon(1))  # None -> everything implemented
    assert full.labels.properties() == ("energy", "forces", "stress")


def test_different_structure_properties_or_settings_are_recomputed():
    oracle = CountingOracle()
    service = LabelService(oracle)
    service.label(argon(1), ["energy"])
    service.label(argon(2), ["energy"])
    service.label(argon(1), ["energy", "forces"])
    assert oracle.calls == 3
    other = LabelService(CountingOracle(epsilon=0.02))
    assert other.label(argon(1), ["energy"]).structure_hash != service.label(argon(1), ["energy"]).structure_hash


def test_cached_labels_cannot_be_corrupted_by_the_caller():
    service = LabelService(CountingOracle())
    first = service.label(argon(1), ["forces"])
    expected = first.labels.forces.copy()
    first.labels.forces[:] = 1e9
    np.testing.assert_array_equal(service.label(argon(1), ["forces"]).labels.forces, expected)


def test_cache_is_lru_bounded_by_entries():
    oracle = CountingOracle()
    service = LabelService(oracle, ServiceConfig(cache_size=2))
    for seed in (1, 2, 3):
        service.label(argon(seed), ["energy"])
    assert service.stats()["cache_entries"] == 2
    service.label(argon(3), ["energy"])  # hit
    service.label(argon(1), ["energy"])  # evicted -> recomputed
    assert oracle.calls == 4


def test_cache_size_zero_disables_the_cache():
    oracle = CountingOracle()
    service = LabelService(oracle, ServiceConfig(cache_size=0))
    service.label(argon(1), ["energy"])
    assert not service.label(argon(1), ["energy"]).cached
    assert oracle.calls == 2


def test_clear_cache_forgets_labels():
    oracle = CountingOracle()
    service = LabelService(oracle)
    service.label(argon(1), ["energy"])
    service.clear_cache()
    service.label(argon(1), ["energy"])
    assert oracle.calls == 2


# ---------------------------------------------------------------------------
# single flight


def test_concurrent_identical_requests_are_coalesced():
    oracle = BlockingOracle()
    service = LabelService(oracle, ServiceConfig(workers=2, queue_limit=0))
    followers = 5
    with ThreadPoolExecutor(max_workers=1 + followers) as pool:
        leader = pool.submit(service.label, argon(1), ["energy", "forces"])
        assert wait_until(lambda: oracle.calls == 1)
        waiting = [pool.submit(service.label, argon(1), ["energy", "forces"]) for _ in range(followers)]
        # queue_limit=0 and workers=2: followers would overload if they were not coalesced
        assert wait_until(lambda: service.stats()["waiting_for_identical"] == followers)
        oracle.release.set()
        first = leader.result(WAIT)
        others = [f.result(WAIT) for f in waiting]
    assert oracle.calls == 1
    assert not first.cached
    for outcome in others:
        assert outcome.cached and outcome.coalesced
        assert outcome.structure_hash == first.structure_hash
        assert outcome.labels.energy == first.labels.energy
    assert service.stats()["calls"]["coalesced"] == followers


def test_waiters_of_a_failed_calculation_get_the_error_and_it_is_not_cached():
    gate = threading.Event()

    class FailOnce(BlockingOracle):
        def calculate(self, atoms, properties):
            if self.calls == 0:
                self.calls += 1
                gate.wait(WAIT)
                raise RuntimeError("SCF did not converge")
            return super().calculate(atoms, properties)

    oracle = FailOnce()
    oracle.release.set()
    service = LabelService(oracle, ServiceConfig(workers=1, queue_limit=0))
    with ThreadPoolExecutor(max_workers=2) as pool:
        leader = pool.submit(service.label, argon(1), ["energy"])
        assert wait_until(lambda: oracle.calls == 1)
        follower = pool.submit(service.label, argon(1), ["energy"])
        assert wait_until(lambda: service.stats()["waiting_for_identical"] == 1)
        gate.set()
        for future in (leader, follower):
            with pytest.raises(CalculationFailed, match="SCF did not converge"):
                future.result(WAIT)
    assert not service.label(argon(1), ["energy"]).cached  # failure was not cached: computed now


# ---------------------------------------------------------------------------
# bounded concurrency


def test_overload_when_workers_and_queue_are_full():
    oracle = BlockingOracle()
    service = LabelService(oracle, ServiceConfig(workers=1, queue_limit=1))
    with ThreadPoolExecutor(max_workers=3) as pool:
        running = pool.submit(service.label, argon(1), ["energy"])
        assert wait_until(lambda: service.in_flight == 1)
        queued = pool.submit(service.label, argon(2), ["energy"])
        assert wait_until(lambda: service.queued == 1)
        with pytest.raises(Overloaded, match=r"1 calculation\(s\) running, 1 waiting"):
            service.label(argon(3), ["energy"])
        # identical to a running request: coalesced, not refused
        same = pool.submit(service.label, argon(1), ["energy"])
        assert wait_until(lambda: service.stats()["waiting_for_identical"] == 1)
        assert service.stats()["calls"]["overloaded"] == 1
        oracle.release.set()
        assert not running.result(WAIT).cached
        assert not queued.result(WAIT).cached
        assert same.result(WAIT).coalesced
    assert oracle.max_running == 1  # workers=1 honoured
    stats = service.stats()
    assert stats["in_flight"] == 0 and stats["queued"] == 0
    # capacity is back, and cached answers never need a worker
    assert service.label(argon(1), ["energy"]).cached
    assert not service.label(argon(3), ["energy"]).cached


def test_workers_bound_parallel_calculations():
    oracle = BlockingOracle()
    service = LabelService(oracle, ServiceConfig(workers=2, queue_limit=4))
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(service.label, argon(seed), ["energy"]) for seed in range(6)]
        assert wait_until(lambda: service.in_flight == 2 and service.queued == 4)
        assert oracle.calls == 2
        oracle.release.set()
        results = [f.result(WAIT) for f in futures]
    assert oracle.calls == 6 and oracle.max_running == 2
    assert len({r.structure_hash for r in results}) == 6


def test_backend_that_is_not_thread_safe_gets_one_worker():
    service = LabelService(SerialOracle(), ServiceConfig(workers=4))
    assert service.workers == 1 and service.describe()["workers"] == 1


def test_caller_timeout_while_queued():
    oracle = BlockingOracle()
    service = LabelService(oracle, ServiceConfig(workers=1, queue_limit=2))
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(service.label, argon(1), ["energy"])
        assert wait_until(lambda: service.in_flight == 1)
        with pytest.raises(CalculationTimeout, match="gave up waiting for a free worker"):
            service.label(argon(2), ["energy"], timeout=0.05)
        assert service.queued == 0  # the abandoned request left the queue
        oracle.release.set()
        running.result(WAIT)
    assert oracle.calls == 1
    assert service.stats()["calls"]["timeout"] == 1


def test_cancelled_caller_leaves_the_queue():
    oracle = BlockingOracle()
    service = LabelService(oracle, ServiceConfig(workers=1, queue_limit=2, poll_seconds=0.005))
    gone = threading.Event()
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = pool.submit(service.label, argon(1), ["energy"])
        assert wait_until(lambda: service.in_flight == 1)
        queued = pool.submit(service.label, argon(2), ["energy"], cancelled=gone.is_set)
        assert wait_until(lambda: service.queued == 1)
        gone.set()
        with pytest.raises(CalculationFailed, match="cancelled"):
            queued.result(WAIT)
        oracle.release.set()
        running.result(WAIT)
    assert oracle.calls == 1 and service.stats()["calls"]["cancelled"] == 1


def test_waiter_retries_when_the_leader_gives_up_before_computing():
    oracle = BlockingOracle()
    service = LabelService(oracle, ServiceConfig(workers=1, queue_limit=2, poll_seconds=0.005))
    leader_gone = threading.Event()
    with ThreadPoolExecutor(max_workers=3) as pool:
        running = pool.submit(service.label, argon(1), ["energy"])
        assert wait_until(lambda: service.in_flight == 1)
        leader = pool.submit(service.label, argon(2), ["energy"], cancelled=leader_gone.is_set)
        assert wait_until(lambda: service.queued == 1)
        follower = pool.submit(service.label, argon(2), ["energy"])
        assert wait_until(lambda: service.stats()["waiting_for_identical"] == 1)
        leader_gone.set()
        with pytest.raises(CalculationFailed, match="cancelled"):
            leader.result(WAIT)
        assert wait_until(lambda: service.queued == 1)  # the follower took over the queue slot
        oracle.release.set()
        running.result(WAIT)
        outcome = follower.result(WAIT)
    assert not outcome.cached and outcome.labels.energy == -4.0
    assert oracle.calls == 2


# ---------------------------------------------------------------------------
# failures


@pytest.mark.parametrize(
    "mode, message",
    [
        ("crash", r"backend 'test-misbehaving' raised RuntimeError: SCF exploded"),
        ("key-error", r"raised KeyError: 'energy'"),
        ("nan-forces", r"non-finite forces on 1 atom\(s\), first atom 2"),
        ("inf-energy", r"non-finite energy: inf"),
        ("nan-stress", r"non-finite stress"),
        ("wrong-shape", r"forces of shape \(5, 3\), expected \(4, 3\)"),
        ("missing", r"did not return \['forces'\]"),
        ("not-labels", r"returned dict, not Labels"),
    ],
)
def test_backend_failures_become_calculation_failed(mode, message):
    oracle = MisbehavingOracle(mode)
    service = LabelService(oracle)
    with pytest.raises(CalculationFailed, match=message) as info:
        service.label(argon(1))
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text  # one line, no stack trace
    with pytest.raises(CalculationFailed):
        service.label(argon(1))
    assert oracle.calls == 2  # failures are not cached
    assert service.stats()["calls"]["failed"] == 2 and service.stats()["cache_entries"] == 0


def test_typed_backend_errors_pass_through():
    with pytest.raises(SetupError, match="pw.x not found on PATH"):
        LabelService(MisbehavingOracle("setup")).label(argon(1))
    service = LabelService(MisbehavingOracle("timeout"))
    with pytest.raises(CalculationTimeout, match="wall-time limit"):
        service.label(argon(1))
    assert service.stats()["calls"]["timeout"] == 1


def test_structure_is_quarantined_after_repeated_failures():
    oracle = MisbehavingOracle("crash")
    service = LabelService(oracle, ServiceConfig(quarantine_after=2))
    for _ in range(2):
        with pytest.raises(CalculationFailed, match="SCF exploded"):
            service.label(argon(1))
    with pytest.raises(CalculationFailed, match=r"quarantined: the backend failed on it 2 times.*SCF exploded"):
        service.label(argon(1))
    assert oracle.calls == 2  # the third request did not run the backend
    assert service.stats()["quarantined"] == 1
    with pytest.raises(CalculationFailed, match="SCF exploded"):
        service.label(argon(2))  # other structures still run
    assert oracle.calls == 3


def test_invalid_input_is_rejected_before_the_backend():
    oracle = CountingOracle()
    service = LabelService(oracle, ServiceConfig(limits=Limits(min_distance=1.0, max_atoms=10)))
    atoms = argon(1)
    atoms.positions[1] = atoms.positions[0] + [0.5, 0.0, 0.0]
    with pytest.raises(InvalidInput, match=r"atoms 0 \(Ar\) and 1 \(Ar\) are 0\.5 Å apart"):
        service.label(atoms)
    with pytest.raises(InvalidInput, match="at most 10"):
        service.label(argon(1, n_cells=2))
    with pytest.raises(InvalidInput, match="unknown properties \\['charges'\\]"):
        service.label(argon(1), ["charges"])
    with pytest.raises(InvalidInput, match="stress requested"):
        service.label(Atoms("Ar2", positions=[[0, 0, 0], [3.8, 0, 0]]), ["stress"])
    assert oracle.calls == 0
    assert service.stats()["calls"]["invalid"] == 4 and service.stats()["cache_entries"] == 0


def test_check_labels_restricts_to_requested_properties():
    labels = Labels(energy=1.0, forces=np.zeros((2, 3)), stress=np.zeros(6), info={"k": 1})
    checked = check_labels(labels, ("energy",), 2)
    assert checked.properties() == ("energy",) and checked.info == {"k": 1}


# ---------------------------------------------------------------------------
# describe and stats


def test_describe_reports_backend_limits_and_capacity():
    service = LabelService.from_backend(
        "emt", {}, ServiceConfig(workers=3, queue_limit=7, limits=Limits(min_distance=0.7, max_atoms=500))
    )
    d = service.describe()
    assert d["backend"] == "emt"
    assert d["implemented_properties"] == ["energy", "forces", "stress"]
    assert 29 in d["supported_numbers"] and "Cu" in d["supported_elements"] and 26 not in d["supported_numbers"]
    assert d["settings"] == {"asap_cutoff": False}
    assert d["version"].startswith("ase ")
    assert d["limits"]["min_distance"] == 0.7 and d["limits"]["max_atoms"] == 500
    assert (d["workers"], d["queue_limit"]) == (3, 7)


def test_describe_any_element_backend():
    d = LabelService(create_oracle("lj")).describe()
    assert d["supported_numbers"] is None and d["supported_elements"] is None


def test_stats_count_every_outcome():
    service = LabelService(CountingOracle())
    stats = service.stats()
    assert set(stats["calls"]) == set(OUTCOMES) and all(v == 0 for v in stats["calls"].values())
    for key in ("in_flight", "queued", "cache_hits", "cache_entries", "compute_seconds_total"):
        assert key in stats
    service.label(argon(1), ["energy"])
    assert service.stats()["compute_seconds_total"] > 0


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="workers"):
        ServiceConfig(workers=0)
    with pytest.raises(ValueError, match="queue_limit"):
        ServiceConfig(queue_limit=-1)
