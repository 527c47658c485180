"""``learner.data`` goes to the learner in AddDataBatch calls that stay far below gRPC's message limit."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from ase.build import bulk
from ase.io import write

from coordinator.rundir import RunDirectory
from coordinator.seed_data import batches, seed_data, seed_learner, wire_bytes
from learner_service.client import LearnerClient
from learner_service.datasets import perturbed_fcc_al
from learner_service.server import LearnerServiceConfig, start_learner_server
from protos.epicycle.v1 import learner_pb2
from protos.errors import InvalidInput

HYPS = {"sig2": 0.5, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05}


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)


def config_for(paths) -> SimpleNamespace:
    return SimpleNamespace(learner=SimpleNamespace(data=[str(p) for p in paths], use_energy=True, use_stress=True,
                                                   model="exact", sparse=SimpleNamespace(labels="all")))


@pytest.mark.parametrize("repeat", [1, 2, 4])
def test_the_size_estimate_bounds_the_serialised_request(tmp_path, repeat) -> None:
    frames = perturbed_fcc_al(3, seed=repeat, repeat=repeat)
    for f in frames:  # stress too: the largest item the seed can send
        f.calc.results["stress"] = np.arange(6.0)
    write(tmp_path / "al.xyz", frames, format="extxyz")
    items = seed_data(config_for([tmp_path / "al.xyz"])).items
    assert all(it["use_stress"] and it["use_energy"] for it in items)
    req = learner_pb2.AddDataBatchRequest(items=[LearnerClient.add_data_request(**it) for it in items])
    assert req.ByteSize() <= sum(wire_bytes(it) for it in items)
    for it in items:
        assert LearnerClient.add_data_request(**it).ByteSize() <= wire_bytes(it)


def test_batches_keep_order_and_respect_the_budget() -> None:
    items = [{"atoms": bulk("Al", "fcc", a=4.05, cubic=True).repeat((n, 1, 1))} for n in (1, 5, 2, 2, 9, 1, 3)]
    budget = wire_bytes(items[1]) + wire_bytes(items[2])
    chunks = batches(items, budget)
    assert [it for c in chunks for it in c] == items  # every item once, in order
    for c in chunks:
        assert len(c) == 1 or sum(wire_bytes(it) for it in c) <= budget  # an oversize item goes alone
    # greedy, with 768 + 256·n_atoms/4 bytes per cell: [1+5] [2+2] [9: the whole budget] [1+3]
    assert [len(c) for c in chunks] == [2, 2, 1, 2]
    assert batches(items, 10**9) == [items]
    with pytest.raises(InvalidInput, match="max_bytes"):
        batches(items, 0)


def test_a_seed_larger_than_one_batch_arrives_whole_over_grpc(tmp_path) -> None:
    frames = perturbed_fcc_al(7, seed=3)
    for f in frames[::2]:
        f.arrays["training"] = np.isin(np.arange(len(f)), [1, 4, 30])
    write(tmp_path / "al.xyz", frames, format="extxyz")
    cfg = config_for([tmp_path / "al.xyz"])
    expected = 4 * 3 + 3 * 32
    runs = {}
    for name, budget in (("one", 10**9), ("several", 2 * wire_bytes(seed_data(cfg).items[0]))):
        running = start_learner_server(LearnerServiceConfig(species=(13,), cutoffs=(5.0, 3.5), hyperparameters=HYPS))
        try:
            client = LearnerClient(running.address)
            client.wait_ready(120)
            rd = RunDirectory.create(tmp_path / name, "name: seed\n")
            progress = Lines()
            seed_learner(cfg, client, rd, progress, max_bytes=budget)
            info = client.info()
            event = next(e for e in rd.events() if e["event"] == "training_seeded")
            runs[name] = (info.n_environments, event["batches"], progress.lines,
                          client.predict(frames[1]).forces)
        finally:
            running.stop()
    assert runs["one"][0] == runs["several"][0] == expected
    assert runs["one"][1] == 1 and runs["several"][1] == 4  # 7 frames, 2 per batch
    assert sum("sent batch" in line for line in runs["several"][2]) == 4
    # the same model, up to the round-off of growing the factorisation in steps (measured 1.6e-8 eV/Å)
    np.testing.assert_allclose(runs["several"][3], runs["one"][3], rtol=0, atol=1e-6)
