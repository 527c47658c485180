"""The Oracle service over real gRPC on 127.0.0.1: labels, cache, validation, overload, failures."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

from oracle_service.base import REGISTRY, Labels, Oracle, register_backend
from oracle_service.client import OracleClient
from oracle_service.server import OracleServiceConfig, start_oracle_server
from protos import errors, wire
from protos.epicycle.v1 import oracle_pb2, oracle_pb2_grpc
from protos.client import make_channel


class GateOracle(Oracle):
    """A real backend (EMT underneath) that holds each calculation until the gate opens."""

    name = "test-gate"
    implemented_properties = ("energy", "forces", "stress")
    gate = threading.Event()
    started = threading.Semaphore(0)

    def calculate(self, atoms, properties):
        GateOracle.started.release()
        if not GateOracle.gate.wait(timeout=30):
            raise RuntimeError("gate never opened")
        a = atoms.copy()
        a.calc = EMT()
        return Labels(energy=a.get_potential_energy(), forces=a.get_forces(), stress=a.get_stress())


class BrokenOracle(Oracle):
    """A backend whose calculation fails like a crashed DFT code."""

    name = "test-broken"
    implemented_properties = ("energy", "forces")

    def calculate(self, atoms, properties):
        raise errors.CalculationFailed("SCF did not converge in 2 iterations", log_tail="iteration 2: dE = 1e-1 Ry")


for _cls in (GateOracle, BrokenOracle):
    if _cls.name not in REGISTRY:
        register_backend(_cls.name)(_cls)


def cu32(seed: int = 0) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=seed)
    return atoms


@pytest.fixture
def emt_server():
    running = start_oracle_server(OracleServiceConfig(backend="emt", max_atoms=500))
    yield running
    running.stop(grace=0)


@pytest.fixture
def client(emt_server):
    with OracleClient(emt_server.address, timeout=30) as c:
        c.wait_ready(10)
        yield c


def test_label_matches_in_process_emt_exactly(client) -> None:
    atoms = cu32(1)
    result = client.label(atoms)
    ref = atoms.copy()
    ref.calc = EMT()
    assert result.backend == "emt" and not result.cached
    assert result.labels.energy == ref.get_potential_energy()
    np.testing.assert_array_equal(result.labels.forces, ref.get_forces())
    np.testing.assert_array_equal(result.labels.stress, ref.get_stress())
    assert result.labels.forces.shape == (32, 3) and result.labels.stress.shape == (6,)


def test_identical_structure_is_labelled_once(client, emt_server) -> None:
    atoms = cu32(2)
    first = client.label(atoms)
    second = client.label(atoms.copy())
    assert second.cached and not first.cached
    assert second.structure_hash == first.structure_hash
    np.testing.assert_array_equal(second.labels.forces, first.labels.forces)
    moved = atoms.copy()
    moved.positions[0, 0] += 1e-6
    assert not client.label(moved).cached
    calls = emt_server.label_service.stats()["calls"]
    assert sum(v for k, v in calls.items() if k != "cached") == 2 or calls.get("computed") == 2


def test_property_subset_and_unknown_property(client) -> None:
    result = client.label(cu32(3), ("energy",))
    assert result.labels.energy is not None
    with pytest.raises(errors.InvalidInput, match="unknown properties"):
        client.label(cu32(3), ("magmoms",))


def test_describe_reports_backend_and_limits(client) -> None:
    d = client.describe()
    assert d.backend == "emt"
    assert set(d.implemented_properties) == {"energy", "forces", "stress"}
    assert 29 in d.supported_numbers and 13 in d.supported_numbers
    assert d.max_atoms == 500 and d.min_distance == pytest.approx(0.5)
    assert "ase" in d.version.lower()


def _raw_label(address: str, structure) -> grpc.RpcError:
    stub = oracle_pb2_grpc.OracleStub(make_channel(address))
    with pytest.raises(grpc.RpcError) as info:
        stub.Label(oracle_pb2.LabelRequest(structure=structure), timeout=10)
    return info.value


def _bad_structures():
    nan = cu32()
    nan.positions[5, 1] = np.nan
    inf = cu32()
    inf.positions[7, 2] = np.inf
    close = cu32()
    close.positions[1] = close.positions[0] + [0.2, 0.0, 0.0]
    flat = cu32()
    flat.cell[2] = flat.cell[0]
    iron = cu32()
    iron.numbers[3] = 26
    big = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((6, 6, 6))  # 864 atoms > max_atoms 500
    yield "nan", wire.structure_to_proto(nan), r"non-finite|NaN|nan"
    yield "inf", wire.structure_to_proto(inf), r"non-finite|inf"
    yield "close", wire.structure_to_proto(close), r"0\.2|closer|distance"
    yield "singular cell", wire.structure_to_proto(flat), r"singular|volume|cell"
    yield "element", wire.structure_to_proto(iron), r"Fe"
    yield "too many", wire.structure_to_proto(big), r"864|too many|max_atoms"
    shape = wire.structure_to_proto(cu32())
    shape.positions.shape[:] = [16, 6]
    yield "shape", shape, r"positions: expected shape"
    cell_nan = cu32()
    cell_nan.cell[1, 1] = np.nan
    yield "cell nan", wire.structure_to_proto(cell_nan), r"cell"


@pytest.mark.parametrize("case", list(_bad_structures()), ids=lambda c: c[0])
def test_bad_input_is_invalid_argument_naming_the_problem(emt_server, case) -> None:
    _, structure, pattern = case
    err = _raw_label(emt_server.address, structure)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    import re

    assert re.search(pattern, err.details(), re.IGNORECASE), err.details()
    assert "Traceback" not in err.details()


def test_failed_calculation_is_aborted_not_internal() -> None:
    with start_oracle_server(OracleServiceConfig(backend="test-broken")) as running:
        with OracleClient(running.address, timeout=10) as c:
            c.wait_ready(10)
            with pytest.raises(errors.CalculationFailed, match="SCF did not converge") as info:
                c.label(cu32())
            assert info.value.grpc_code == grpc.StatusCode.ABORTED
            assert "iteration 2" in str(info.value)  # the log tail reaches the user


def test_full_queue_answers_resource_exhausted() -> None:
    GateOracle.gate.clear()
    config = OracleServiceConfig(backend="test-gate", workers=1, queue_limit=1)
    with start_oracle_server(config) as running:
        with OracleClient(running.address, timeout=30) as c:
            c.wait_ready(10)
            results: dict[int, object] = {}

            def call(i: int) -> None:
                try:
                    results[i] = c.label(cu32(10 + i))
                except errors.EpicycleError as exc:
                    results[i] = exc

            first = threading.Thread(target=call, args=(0,))
            first.start()
            assert GateOracle.started.acquire(timeout=10)  # worker busy
            second = threading.Thread(target=call, args=(1,))
            second.start()
            deadline = time.monotonic() + 10
            while running.label_service.stats()["queued"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert running.label_service.stats()["queued"] == 1
            with pytest.raises(errors.Overloaded) as info:
                c.label(cu32(12))
            assert info.value.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
            GateOracle.gate.set()
            first.join(10)
            second.join(10)
            assert all(hasattr(results[i], "labels") for i in (0, 1)), results
            # after the burst the service accepts work again
            assert c.label(cu32(13)).labels.forces.shape == (32, 3)
