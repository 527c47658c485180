"""``latency_s`` of the emt and lj backends: a sleep inside the calculation (test/benchmark aid).

It must be applied (a calculation takes at least ``latency_s``), occupy a worker slot (the
service counts it in flight and queues behind it), leave the labels bit-for-bit unchanged,
be rejected with a message naming the setting when it is not a finite number >= 0, and end
at once when the oracle is closed or nobody waits for the calculation any more.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from oracle_service.base import create_oracle
from oracle_service.client import OracleClient
from oracle_service.core import LabelService, ServiceConfig, backend_identity
from oracle_service.server import OracleServiceConfig, start_oracle_server
from protos import errors
from protos.status import status_for

LATENCY_S = 0.25
PROPERTIES = ("energy", "forces", "stress")


def structure(backend: str, seed: int = 0) -> Atoms:
    atoms = (bulk("Cu", "fcc", a=3.61, cubic=True) if backend == "emt" else
             bulk("Ar", "fcc", a=5.26, cubic=True)).repeat(2)
    atoms.rattle(0.05, seed=seed)
    return atoms


@pytest.mark.parametrize("backend", ["emt", "lj"])
def test_latency_is_applied_and_labels_are_unchanged(backend: str) -> None:
    atoms = structure(backend)
    plain = create_oracle(backend).calculate(atoms, PROPERTIES)
    slow = create_oracle(backend, latency_s=LATENCY_S)
    started = time.perf_counter()
    labels = slow.calculate(atoms, PROPERTIES)
    assert time.perf_counter() - started >= LATENCY_S
    assert labels.energy == plain.energy
    np.testing.assert_array_equal(labels.forces, plain.forces)
    np.testing.assert_array_equal(labels.stress, plain.stress)


@pytest.mark.parametrize("backend", ["emt", "lj"])
def test_latency_is_reported_in_settings_and_zero_means_off(backend: str) -> None:
    assert create_oracle(backend, latency_s=1.5).settings()["latency_s"] == 1.5
    assert create_oracle(backend, latency_s="2").settings()["latency_s"] == 2.0  # as from a YAML string
    # the default and an explicit 0 leave the backend identity (and so the cache key) as it was
    assert backend_identity(create_oracle(backend, latency_s=0)) == backend_identity(create_oracle(backend))
    assert "latency_s" not in create_oracle(backend).settings()


@pytest.mark.parametrize("backend", ["emt", "lj"])
@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), "soon", True, None, [1]])
def test_bad_latency_is_rejected_naming_the_setting(backend: str, value) -> None:
    with pytest.raises(errors.InvalidInput, match=r"latency_s .*seconds.* finite number >= 0"):
        create_oracle(backend, latency_s=value)


def test_bad_latency_refuses_to_start_a_worker() -> None:
    with pytest.raises(errors.InvalidInput, match="latency_s") as info:
        start_oracle_server(OracleServiceConfig(backend="emt", settings={"latency_s": -2}))
    assert status_for(info.value) == grpc.StatusCode.INVALID_ARGUMENT


def test_latency_occupies_a_worker_slot() -> None:
    """Two different structures on one worker: the second waits queued while the first sleeps."""
    service = LabelService(create_oracle("emt", latency_s=LATENCY_S), ServiceConfig(workers=1, queue_limit=4))
    results: list = []
    started = time.perf_counter()
    threads = [threading.Thread(target=lambda s=s: results.append(service.label(structure("emt", s))))
               for s in (1, 2)]
    # start the second request only once the first holds the worker: otherwise both can be
    # admitted before either takes the slot, and "2 queued" is then a true (but racy) reading
    threads[0].start()
    while service.stats()["in_flight"] < 1 and threads[0].is_alive():
        time.sleep(0.001)
    threads[1].start()
    seen = {"in_flight": 0, "queued": 0}
    while any(t.is_alive() for t in threads):
        stats = service.stats()
        for key in seen:
            seen[key] = max(seen[key], stats[key])
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    assert seen == {"in_flight": 1, "queued": 1}
    assert elapsed >= 2 * LATENCY_S  # serialised by the one worker
    assert len(results) == 2 and all(r.seconds >= LATENCY_S and not r.cached for r in results)
    assert service.stats()["compute_seconds_total"] >= 2 * LATENCY_S
    # a cache hit does not sleep: the calculation is not run again
    started = time.perf_counter()
    assert service.label(structure("emt", 1)).cached
    assert time.perf_counter() - started < LATENCY_S


def test_caller_deadline_shorter_than_latency() -> None:
    """The caller gets DEADLINE_EXCEEDED on time; as nobody waits for the calculation any more,
    its sleep is cancelled (the worker is free at once, nothing is cached), like a killed pw.x;
    a retry computes the same labels."""
    latency = 1.0
    config = OracleServiceConfig(backend="emt", settings={"latency_s": latency}, workers=1)
    with start_oracle_server(config) as running:
        with OracleClient(running.address, timeout=30) as client:
            client.wait_ready(10)
            atoms = structure("emt", 3)
            started = time.perf_counter()
            with pytest.raises(errors.CalculationTimeout):
                client.label(atoms, timeout=0.2)
            assert time.perf_counter() - started < latency
            service = running.label_service
            deadline = time.monotonic() + 10
            while service.stats()["calculations_cancelled"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            stats = service.stats()
            assert stats["calculations_cancelled"] == 1 and stats["cache_entries"] == 0
            assert stats["in_flight"] == 0 and time.perf_counter() - started < latency
            retry = client.label(atoms)
            assert not retry.cached
            reference = create_oracle("emt").calculate(atoms, PROPERTIES)
            np.testing.assert_array_equal(retry.labels.forces, reference.forces)


@pytest.mark.parametrize("backend", ["emt", "lj"])
def test_close_ends_a_sleep_under_way(backend: str) -> None:
    oracle = create_oracle(backend, latency_s=30)
    outcome: list = []

    def run() -> None:
        try:
            oracle.calculate(structure(backend), PROPERTIES)
        except errors.EpicycleError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.1)
    started = time.perf_counter()
    oracle.close()
    thread.join(5)
    assert not thread.is_alive() and time.perf_counter() - started < 5
    assert len(outcome) == 1 and isinstance(outcome[0], errors.CalculationFailed)
    assert "latency_s" in str(outcome[0]) and "closed" in str(outcome[0])
