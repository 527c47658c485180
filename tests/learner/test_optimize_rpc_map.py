"""Optimize with method "map" over real gRPC on 127.0.0.1: the learner selects hyperparameters as
map_optimize does on the same split of its own frames (``epicycle fit``'s model selection)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

from learner_service.client import LearnerClient
from learner_service.gp import GaussianProcess
from learner_service.model_selection import holdout_split, map_optimize
from learner_service.server import LearnerServiceConfig, start_learner_server
from protos import errors
from protos.client import make_channel
from protos.epicycle.v1 import learner_pb2, learner_pb2_grpc

HYPS = {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05}
CUTOFFS = (5.0, 3.5)
ATOMS = [[0, 5, 10, 20], [1, 7, 12], [2, 9, 17, 25, 30], [3, 4]]  # trained atoms of frames 0..3


def al32(seed: int, amplitude: float = 0.12) -> Atoms:
    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))
    rng = np.random.default_rng(seed)
    atoms.positions += rng.uniform(-amplitude, amplitude, size=atoms.positions.shape)
    return atoms


def frames():
    out = []
    for k, idx in enumerate(ATOMS):
        atoms = al32(100 + k)
        a = atoms.copy()
        a.calc = EMT()
        out.append((atoms, a.get_forces(), idx))
    return out


def _server(**kw):
    return start_learner_server(LearnerServiceConfig(species=(13,), cutoffs=CUTOFFS, hyperparameters=HYPS, **kw))


def _status(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=60)
    return info.value.code(), info.value.details()


def reference_map(data, holdout: float, seed: int, restarts: int) -> dict:
    """map_optimize on the split ``epicycle fit`` would make of the same frames."""
    train, held = holdout_split([idx for _, _, idx in data], holdout, seed)
    sub = GaussianProcess([13], CUTOFFS, hyperparameters=HYPS)
    validation = []
    for k, (atoms, forces, _) in enumerate(data):
        if held[k]:
            validation.append((atoms, held[k], forces))
        if train[k]:
            sub.add_structure(atoms, forces=forces, atom_indices=train[k])
    assert validation and any(not t for t in train)  # whole frames held out, as intended
    result = map_optimize(sub, prior="data", restarts=restarts, seed=seed, max_iterations=20,
                          validation=validation)
    return result.hyperparameters


def test_map_moves_the_hyperparameters_where_map_optimize_puts_them_on_the_same_split() -> None:
    data = frames()
    running = _server()
    try:
        with LearnerClient(running.address) as c:
            c.wait_ready(120)
            for atoms, forces, idx in data:
                c.add_data(atoms, forces=forces, atom_indices=idx)
            reply = c.optimize(method="map", restarts=1, seed=3, holdout=0.25)
            info = c.info()
            served = {h.name: h.value for h in reply.hyperparameters}
            # the served model predicts with them (every atom trained on, hyperparameters as selected)
            gp = GaussianProcess([13], CUTOFFS, hyperparameters=served)
            for atoms, forces, idx in data:
                gp.add_structure(atoms, forces=forces, atom_indices=idx)
            gp.train()
            probe = al32(999)
            remote = c.predict(probe)
    finally:
        running.stop(grace=0)
    want = reference_map(data, 0.25, 3, 1)
    for name in ("sig2", "ls2", "sig3", "ls3", "noise"):
        assert served[name] == pytest.approx(want[name], rel=1e-6), name
    # they moved: the search did something (several fold for some of them, from 1 Å length scales)
    assert max(abs(np.log(served[n] / HYPS[n])) for n in HYPS) > 0.5
    assert reply.model_version == info.model_version and info.n_environments == sum(map(len, ATOMS))
    assert "held out" in reply.message and "whole frame" in reply.message
    assert reply.log_likelihood == pytest.approx(gp.log_likelihood(), rel=1e-9, abs=1e-6)
    local = gp.predict(probe)
    np.testing.assert_allclose(remote.forces, local.forces, rtol=1e-7, atol=1e-9)


def test_bad_methods_and_map_settings_are_invalid_arguments_naming_the_problem() -> None:
    data = frames()
    running = _server()
    try:
        with LearnerClient(running.address) as c:
            c.wait_ready(120)
            atoms, forces, idx = data[0]
            c.add_data(atoms, forces=forces, atom_indices=idx)
        with make_channel(running.address) as ch:
            stub = learner_pb2_grpc.LearnerStub(ch)
            code, text = _status(stub.Optimize, learner_pb2.OptimizeRequest(method="mapp"))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "'mapp'" in text and "map" in text
            cases = [(learner_pb2.OptimizeRequest(method="map", holdout=1.0), "holdout"),
                     (learner_pb2.OptimizeRequest(method="map", restarts=-1), "restarts"),
                     (learner_pb2.OptimizeRequest(method="map", restarts=2**31 - 1), "restarts"),
                     (learner_pb2.OptimizeRequest(method="map", tolerance=1e-3), "tolerance"),
                     (learner_pb2.OptimizeRequest(method="map", space="linear"), "space"),
                     (learner_pb2.OptimizeRequest(method="map", fixed=["ls9"]), "ls9"),
                     (learner_pb2.OptimizeRequest(method="ml", restarts=2), "restarts")]
            for req, word in cases:
                code, text = _status(stub.Optimize, req)
                assert code == grpc.StatusCode.INVALID_ARGUMENT and word in text, (req, text)
            version = stub.GetModelInfo(learner_pb2.GetModelInfoRequest(), timeout=30).model_version
            assert version == 2  # no rejected request changed the model
    finally:
        running.stop(grace=0)


def test_map_on_a_sparse_learner_is_refused_not_ignored() -> None:
    data = frames()
    running = _server(model_kind="sparse")
    try:
        with LearnerClient(running.address) as c:
            c.wait_ready(120)
            atoms, forces, idx = data[0]
            c.add_data(atoms, forces=forces, atom_indices=idx)
            before = c.info()
            with pytest.raises(errors.EpicycleError, match="exact GP.*sparse"):
                c.optimize(method="map")
            assert c.info().model_version == before.model_version
    finally:
        running.stop(grace=0)


def test_a_model_loaded_from_a_file_is_searched_without_a_check_and_says_so(tmp_path) -> None:
    """A model file keeps environments, not frames: map still runs (prior, restarts) on all data and the
    reply says that no frames were held out beyond the cross-validation -- the same hyperparameters as map_optimize."""
    data = frames()
    gp = GaussianProcess([13], CUTOFFS, hyperparameters=HYPS)
    for atoms, forces, idx in data:
        gp.add_structure(atoms, forces=forces, atom_indices=idx)
    gp.train()
    gp.save(tmp_path / "m.npz")
    running = start_learner_server(LearnerServiceConfig(model_path=tmp_path / "m.npz"))
    try:
        with LearnerClient(running.address) as c:
            c.wait_ready(120)
            reply = c.optimize(method="map", restarts=0, seed=1)
    finally:
        running.stop(grace=0)
    assert "no extra held-out frames" in reply.message and "model file" in reply.message
    want = map_optimize(GaussianProcess.load(tmp_path / "m.npz"), prior="data", restarts=0, seed=1,
                        max_iterations=20).hyperparameters
    served = {h.name: h.value for h in reply.hyperparameters}
    for name in ("sig2", "ls2", "sig3", "ls3", "noise"):
        assert served[name] == pytest.approx(want[name], rel=1e-6), name


def test_the_gp_remembers_its_frames_through_clone_and_truncation_but_not_through_a_model_file(tmp_path) -> None:
    data = frames()
    gp = GaussianProcess([13], CUTOFFS, hyperparameters=HYPS)
    assert gp.labelled_frames() == ()
    for atoms, forces, idx in data[:2]:
        gp.add_structure(atoms, forces=forces, atom_indices=idx)
    gp.train()
    counts, hyps, history = gp.data_counts(), gp.hyperparameters, gp.factor_history
    for atoms, forces, idx in data[2:]:
        gp.add_structure(atoms, forces=forces, atom_indices=idx)
    gp.train()
    got = gp.labelled_frames()
    assert len(got) == 4
    for f, (atoms, forces, idx) in zip(got, data):
        np.testing.assert_array_equal(f.atoms().positions, atoms.positions)
        np.testing.assert_array_equal(f.atoms().numbers, atoms.numbers)
        np.testing.assert_array_equal(f.forces, forces)
        assert f.atom_indices.tolist() == idx and f.energy is None and f.stress is None
    # a model re-trained from the remembered frames is the model itself
    again = gp.empty_copy()
    for f in got:
        again.add_structure(f.atoms(), forces=f.forces, atom_indices=f.atom_indices)
    np.testing.assert_array_equal(again.labels, gp.labels)
    assert again.log_likelihood() == pytest.approx(gp.log_likelihood(), rel=1e-12)
    assert len(gp.truncated(counts, hyps, history).labelled_frames()) == 2
    clone = gp.clone()
    clone.add_structure(*data[0][:2], atom_indices=[31])
    assert len(clone.labelled_frames()) == 5 and len(gp.labelled_frames()) == 4
    gp.save(tmp_path / "m.npz")
    loaded = GaussianProcess.load(tmp_path / "m.npz")
    assert loaded.labelled_frames() is None  # environments only: the frames are unknown
    loaded.add_structure(*data[0][:2], atom_indices=[31])
    assert loaded.labelled_frames() is None


def test_a_learner_rebuilt_from_its_model_directory_still_holds_frames_out(tmp_path) -> None:
    """A resumed run's learner rebuilds its model from its checkpoint (the frames re-added): map keeps its
    held-out check, and selects what the uninterrupted learner selects."""
    data = frames()
    first = _server(model_dir=tmp_path / "m")
    try:
        with LearnerClient(first.address) as c:
            c.wait_ready(120)
            for atoms, forces, idx in data:
                c.add_data(atoms, forces=forces, atom_indices=idx)
            c.checkpoint()
            want = c.optimize(method="map", restarts=0, seed=2, holdout=0.25)
    finally:
        first.stop(grace=0)
    again = start_learner_server(LearnerServiceConfig(model_dir=tmp_path / "m"))
    try:
        with LearnerClient(again.address) as c:
            c.wait_ready(120)
            got = c.optimize(method="map", restarts=0, seed=2, holdout=0.25)
    finally:
        again.stop(grace=0)
    assert "whole frame" in got.message and got.message == want.message
    assert {h.name: h.value for h in got.hyperparameters} == pytest.approx(
        {h.name: h.value for h in want.hyperparameters}, rel=1e-9)
