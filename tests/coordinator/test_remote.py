"""Remote mode: the coordinator drives services it did not start, spread over several oracle workers."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from coordinator.config import parse_config
from coordinator.cycle import OnTheFlyRun, Progress
from coordinator.rundir import RunDirectory
from coordinator.services import Services, OraclePool
from learner_service.server import LearnerServiceConfig, start_learner_server
from oracle_service.server import OracleServiceConfig, start_oracle_server
from protos.errors import CalculationFailed
from sampler_service.server import SamplerServiceConfig, start_sampler_server
from ase.build import bulk

HYPS = {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05}


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def cluster(tmp_path_factory):
    oracles = [start_oracle_server(OracleServiceConfig()) for _ in range(2)]
    learner = start_learner_server(LearnerServiceConfig(species=(13,), cutoffs=(5.0, 3.5), hyperparameters=HYPS,
                                                        model_dir=tmp_path_factory.mktemp("learner")))
    sampler = start_sampler_server(SamplerServiceConfig(default_learner=learner.address))
    yield oracles, learner, sampler
    for s in (sampler, learner, *oracles):
        s.stop(grace=0)


def run_remote(tmp_path: Path, oracle_addresses: list[str], learner, sampler, steps: int = 60):
    config = parse_config({
        "name": "remote", "seed": 5,
        "structure": {"generator": "fcc", "element": "Al", "a": 4.05, "repeat": [2, 2, 2], "rattle": 0.03},
        "oracle": {"addresses": oracle_addresses, "timeout_s": 30, "attempts": 3},
        "learner": {"address": learner.address, "cutoffs": [5.0, 3.5], "hyperparameters": HYPS,
                    "optimize": {"every": 2, "until_calls": 6, "max_iterations": 20}},
        "sampler": {"address": sampler.address, "timestep_fs": 5.0, "temperature_K": 600.0, "steps": steps,
                    "frame_interval": 10, "checkpoint_interval": 60},
        "policy": {"initial_atoms": 3, "atoms_per_call": 1},
    })
    rd = RunDirectory.create(tmp_path / "run", "remote\n")
    pool = OraclePool(oracle_addresses, config.oracle.timeout_s, config.oracle.attempts)
    services = Services(oracle=pool, learner_address=learner.address, sampler_addresses=[sampler.address],
                        oracle_workers=len(oracle_addresses))
    try:
        state = OnTheFlyRun(config, rd, services, Progress(steps, 5.0, quiet=True)).run()
    finally:
        pool.close()
        rd.close()
    return state, rd, pool


def test_labels_spread_over_workers_and_a_dead_worker_is_skipped(tmp_path: Path, cluster) -> None:
    oracles, learner, sampler = cluster
    addresses = [dead_address(), oracles[0].address, oracles[1].address]
    state, rd, pool = run_remote(tmp_path, addresses, learner, sampler)
    assert state.finished and state.oracle_calls >= 3
    events = [json.loads(x) for x in (rd.path / "events.jsonl").read_text().splitlines()]
    workers = [e["worker"] for e in events if e["event"] == "oracle_call"]
    assert len(workers) == state.oracle_calls == rd.label_count()  # no label lost
    ports = {w.rsplit(":", 1)[1] for w in workers}
    assert ports == {str(o.port) for o in oracles}  # both live workers labelled, the dead one never
    computed = sum(o.label_service.stats()["calls"]["computed"] for o in oracles)
    assert computed == state.oracle_calls  # every label computed exactly once
    # the cycle never moves the model: no ExportModel/LoadModel, the learner checkpoints itself
    handled = {s.labels["grpc_method"]: s.value for m in learner.registry.collect() for s in m.samples
               if m.name == "epicycle_grpc_server_handled" and s.name.endswith("_total")}
    assert handled.get("AddDataBatch", 0) >= 1 and handled.get("Checkpoint", 0) >= 1
    assert handled.get("ExportModel", 0) == 0 and handled.get("LoadModel", 0) == 0 and handled.get("AddData", 0) == 0


def test_a_worker_that_dies_mid_run_is_failed_over(cluster) -> None:
    oracles, _, _ = cluster
    pool = OraclePool([o.address for o in oracles], timeout=30, attempts=3)
    try:
        pool.wait_ready(30)
        oracles[0].stop(grace=0)
        results = []
        for seed in range(4):
            atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))
            atoms.rattle(0.05, seed=100 + seed)
            results.append(pool.label(atoms))
    finally:
        pool.close()
    assert all(r.worker.endswith(f":{oracles[1].port}") for r in results)
    assert pool.failovers >= 1


def test_client_side_round_robin_over_one_target(cluster) -> None:
    oracles, _, _ = cluster
    target = "ipv4:" + ",".join(o.address for o in oracles)
    pool = OraclePool([target], timeout=30, attempts=2)
    try:
        pool.wait_ready(30)
        for seed in range(6):
            atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))
            atoms.rattle(0.05, seed=seed)
            pool.label(atoms)
    finally:
        pool.close()
    counts = [o.label_service.stats()["calls"]["computed"] for o in oracles]
    assert sum(counts) == 6 and min(counts) >= 1, counts


def test_every_worker_down_is_a_clear_failure() -> None:
    pool = OraclePool([dead_address(), dead_address()], timeout=3, attempts=2)
    try:
        with pytest.raises(CalculationFailed, match="no oracle worker could label"):
            pool.label(bulk("Al", "fcc", a=4.05, cubic=True))
    finally:
        pool.close()
