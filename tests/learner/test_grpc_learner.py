"""The Learner service over real gRPC on 127.0.0.1."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

from learner_service.client import LearnerClient
from learner_service.server import LearnerServiceConfig, start_learner_server
from protos import errors, wire
from protos.client import make_channel
from protos.epicycle.v1 import learner_pb2, learner_pb2_grpc

HYPS = {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05}


def al32(seed: int, amplitude: float = 0.1) -> Atoms:
    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))
    rng = np.random.default_rng(seed)
    atoms.positions += rng.uniform(-amplitude, amplitude, size=atoms.positions.shape)
    return atoms


def emt_labels(atoms: Atoms):
    a = atoms.copy()
    a.calc = EMT()
    return a.get_potential_energy(), a.get_forces(), a.get_stress()


@pytest.fixture(scope="module")
def server():
    running = start_learner_server(LearnerServiceConfig(species=(13, 29), cutoffs=(5.0, 3.5), hyperparameters=HYPS))
    yield running
    running.stop(grace=0)


@pytest.fixture(scope="module")
def trained(server):
    """A learner with two Al frames (4 atoms each) in its training set."""
    with LearnerClient(server.address) as c:
        c.wait_ready(120)
        for seed in (1, 2):
            atoms = al32(seed)
            e, f, s = emt_labels(atoms)
            c.add_data(atoms, forces=f, atom_indices=[0, 5, 10, 20], energy=e, stress=s)
        yield c


def test_add_data_bumps_the_version_and_grows_the_training_set(server) -> None:
    with LearnerClient(server.address) as c:
        before = c.info()
        atoms = al32(7)
        _, f, _ = emt_labels(atoms)
        reply = c.add_data(atoms, forces=f, atom_indices=[3])
        after = c.info()
    assert reply.model_version == before.model_version + 1 == after.model_version
    assert after.n_environments == before.n_environments + 1
    assert after.n_labels == before.n_labels + 3


def test_unary_and_stream_predictions_agree_and_carry_the_version(trained) -> None:
    atoms = al32(11)
    unary = trained.predict(atoms)
    version = trained.info().model_version
    assert unary.model_version == version
    assert unary.forces.shape == (32, 3) and unary.force_std.shape == (32, 3)
    assert np.all(unary.force_std > 0) and unary.noise == pytest.approx(HYPS["noise"])
    stream = trained.stream(timeout=60)
    try:
        for k in range(3):
            moved = atoms.copy()
            moved.positions[0, 0] += 0.01 * k
            p = stream.predict(moved.positions, moved.numbers, moved.cell.array, moved.pbc)
            ref = trained.predict(moved)
            np.testing.assert_array_equal(p.forces, ref.forces)
            np.testing.assert_array_equal(p.force_std, ref.force_std)
            assert p.model_version == version
    finally:
        stream.close()


def test_model_predicts_unseen_structures(trained) -> None:
    atoms = al32(21, amplitude=0.08)
    _, f_ref, _ = emt_labels(atoms)
    p = trained.predict(atoms)
    assert np.sqrt(np.mean((p.forces - f_ref) ** 2)) < 0.5 * np.sqrt(np.mean(f_ref ** 2))


def test_untrained_species_has_prior_sigma(trained) -> None:
    """Cu is a species of the model without training data: its σ is the prior σ of an empty model."""
    from learner_service.gp import GaussianProcess

    cu = al32(3)
    cu.numbers[:] = 29
    p = trained.predict(cu)
    empty = GaussianProcess(species=[13, 29], cutoffs=(5.0, 3.5), hyperparameters=HYPS).predict(cu)
    np.testing.assert_allclose(p.force_std, empty.force_std, rtol=1e-10)
    np.testing.assert_array_equal(p.forces, np.zeros_like(p.forces))  # prior mean
    al = trained.predict(al32(3))
    assert np.median(p.force_std) > 2 * np.median(al.force_std)


def test_predictions_during_an_update_see_one_consistent_model(server) -> None:
    with LearnerClient(server.address) as c:
        probe = al32(31)
        seen: list = []
        stop = threading.Event()

        def hammer():
            while not stop.is_set():
                seen.append(c.predict(probe))

        t = threading.Thread(target=hammer)
        t.start()
        try:
            for seed in (41, 42):
                atoms = al32(seed)
                _, f, _ = emt_labels(atoms)
                c.add_data(atoms, forces=f, atom_indices=[1, 2])
        finally:
            stop.set()
            t.join()
        by_version: dict[int, object] = {}
        for p in seen:
            ref = by_version.setdefault(p.model_version, p)
            np.testing.assert_array_equal(p.forces, ref.forces)  # one model per version
            np.testing.assert_array_equal(p.force_std, ref.force_std)
        assert len(seen) > 0


def test_optimize_reports_convergence(trained) -> None:
    reply = trained.optimize(max_iterations=40)
    assert reply.iterations >= 1 and np.isfinite(reply.log_likelihood)
    assert {h.name for h in reply.hyperparameters} >= {"sig2", "ls2", "sig3", "ls3", "noise"}
    assert reply.converged or "iteration" in reply.message.lower()
    info = trained.info()
    assert info.model_version == reply.model_version
    assert info.log_likelihood == pytest.approx(reply.log_likelihood, rel=1e-6, abs=1e-6)


def test_optimize_honours_bounds_fixed_hyperparameters_and_tolerance(trained) -> None:
    before = {h.name: h.value for h in trained.info().hyperparameters}
    # noise-free EMT labels: the likelihood wants σn far below 0.02 eV/Å, so the floor must hold it
    reply = trained.optimize(max_iterations=30, tolerance=1e-8, bounds={"noise": (0.02, 0.5)}, fixed=["ls3"])
    hyps = {h.name: h.value for h in reply.hyperparameters}
    assert hyps["noise"] == pytest.approx(0.02, rel=1e-9)
    assert "noise" in reply.at_bounds
    assert hyps["ls3"] == before["ls3"]
    assert trained.info().noise_std == pytest.approx(0.02, rel=1e-9)


def test_bad_optimize_requests_are_invalid_argument(trained) -> None:
    cases = [
        ({"bounds": {"noise": (0.5, 0.1)}}, "0 < lower < upper"),
        ({"bounds": {"noise": (0.0, 0.1)}}, "0 < lower < upper"),
        ({"bounds": {"noise": (0.01, float("inf"))}}, "0 < lower < upper"),
        ({"bounds": {"temperature": (1.0, 2.0)}}, "unknown hyperparameter 'temperature'"),
        ({"fixed": ["nonsense"]}, "nonsense"),
        ({"space": "sqrt"}, "space must be 'log' or 'linear'"),
    ]
    version = trained.info().model_version
    for kwargs, message in cases:
        with pytest.raises(errors.InvalidInput, match=message.replace("(", r"\(")):
            trained.optimize(max_iterations=5, **kwargs)
    assert trained.info().model_version == version  # nothing changed


def test_export_and_load_round_trip(trained, server) -> None:
    exported = trained.export_model()
    assert exported.format == "epicycle-gp" and exported.format_version >= 1
    probe = al32(51)
    before = trained.predict(probe)
    other = start_learner_server(LearnerServiceConfig(species=(13,), cutoffs=(4.0, 3.0), hyperparameters=HYPS))
    try:
        with LearnerClient(other.address) as c2:
            info = c2.load_model(exported.model)
            assert info.n_environments == trained.info().n_environments
            after = c2.predict(probe)
        np.testing.assert_allclose(after.forces, before.forces, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(after.force_std, before.force_std, rtol=1e-12, atol=1e-12)
        with LearnerClient(other.address) as c2:
            with pytest.raises(errors.InvalidInput, match="cannot load the model|model"):
                c2.load_model(b"this is not a model")
    finally:
        other.stop(grace=0)


def _raw(server, method: str, request):
    stub = learner_pb2_grpc.LearnerStub(make_channel(server.address))
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, method)(request, timeout=30)
    return info.value


def test_bad_requests_are_invalid_argument(server) -> None:
    atoms = al32(61)
    _, f, _ = emt_labels(atoms)

    def add(atom_indices, forces=f, structure_atoms=atoms):
        req = learner_pb2.AddDataRequest(atom_indices=atom_indices)
        wire.structure_to_proto(structure_atoms, out=req.structure)
        if forces is not None:
            wire.labels_to_proto(None, forces, None, out=req.labels)
        return req

    cases = [
        ("AddData", add([40]), "atom index 40 is out of range"),
        ("AddData", add([-1]), "atom index -1 is out of range"),
        ("AddData", add([1, 1]), "unique"),
        ("AddData", add([1], forces=f[:5]), "labels.forces: expected shape"),
        ("AddData", add([1], forces=None), "labels.forces is required"),
        ("AddData", add([1], forces=np.where(np.arange(96).reshape(32, 3) == 7, np.nan, f)), "non-finite"),
    ]
    nan_atoms = atoms.copy()
    nan_atoms.positions[2, 1] = np.nan
    req = learner_pb2.PredictRequest()
    wire.structure_to_proto(nan_atoms, out=req.structure)
    cases.append(("Predict", req, "positions contains a non-finite value"))
    req = learner_pb2.PredictRequest(atom_indices=[99])
    wire.structure_to_proto(atoms, out=req.structure)
    cases.append(("Predict", req, "atom index 99 is out of range"))
    req = learner_pb2.PredictRequest()
    wire.structure_to_proto(atoms, out=req.structure)
    req.structure.positions.shape[:] = [16, 6]
    cases.append(("Predict", req, "positions: expected shape"))
    for method, request, message in cases:
        err = _raw(server, method, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, err.details())
        assert message in err.details(), (message, err.details())


def test_saved_model_reloads_bit_for_bit_after_incremental_updates(tmp_path) -> None:
    """The Cholesky factor built by block updates is saved, so predictions after a reload are identical
    (a resumed on-the-fly run must continue the same trajectory)."""
    from learner_service.gp import GaussianProcess

    gp = GaussianProcess(species=[13], cutoffs=(5.0, 3.5), hyperparameters=HYPS)
    for seed in (1, 2, 3):  # three incremental additions -> block-updated factor
        atoms = al32(seed)
        _, f, _ = emt_labels(atoms)
        gp.add_structure(atoms, forces=f, atom_indices=[seed, seed + 7])
        gp.train()
    gp.save(tmp_path / "m.npz")
    back = GaussianProcess.load(tmp_path / "m.npz")
    probe = al32(77)
    a, b = gp.predict(probe), back.predict(probe)
    np.testing.assert_array_equal(a.forces, b.forces)
    np.testing.assert_array_equal(a.force_std, b.force_std)


def test_stream_requests_after_the_first_are_checked_against_its_atoms(server) -> None:
    atoms = al32(81)
    first = learner_pb2.PredictRequest(sequence=1)
    wire.structure_to_proto(atoms, out=first.structure)
    short = learner_pb2.PredictRequest(sequence=2)  # positions only, one atom short
    wire.encode_array(atoms.positions[:31], "<f8", short.structure.positions)
    stub = learner_pb2_grpc.LearnerStub(make_channel(server.address))
    replies = stub.PredictStream(iter([first, short]), timeout=30)
    assert next(replies).sequence == 1
    with pytest.raises(grpc.RpcError) as info:
        next(replies)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "structure.positions: expected shape (32, 3)" in info.value.details()


# --------------------------------------------------------------------------- structure checks (issue 12)


@pytest.fixture(scope="module")
def strict():
    """A learner with a small atom limit (40) and the default minimum distance (0.5 Å)."""
    running = start_learner_server(LearnerServiceConfig(species=(13,), cutoffs=(5.0, 3.5), hyperparameters=HYPS,
                                                        max_atoms=40, warm_up=False))
    yield running
    running.stop(grace=0)


def _add_request(atoms: Atoms, atom_indices, forces=None) -> learner_pb2.AddDataRequest:
    forces = np.zeros((len(atoms), 3)) if forces is None else forces
    return LearnerClient.add_data_request(atoms, forces=forces, atom_indices=atom_indices)


def test_add_data_refuses_bad_structures_naming_the_problem(strict) -> None:
    same_site = al32(91)
    same_site.positions[4] = same_site.positions[12]
    copper = al32(92)
    copper.numbers[6] = 29
    big = al32(93).repeat((2, 1, 1))  # 64 atoms > 40
    lonely = Atoms("Al3", positions=[[1, 1, 1], [3.8, 1, 1], [15, 15, 15]], cell=[30, 30, 30], pbc=True)
    cases = [
        (_add_request(same_site, [0]), "atoms 4 (Al) and 12 (Al) are 0 Å apart, closer than the minimum distance 0.5 Å"),
        (_add_request(copper, [0]), "Cu (Z=29) not in the model's species (first at atom 6); the model's species are Al (Z=13)"),
        (_add_request(big, [0]), "64 atoms; at most 40 accepted (the atom limit)"),
        (_add_request(lonely, [0, 2]), "atom 2 (Al) has no neighbour within the model's 2-body cutoff 5 Å"),
    ]
    for request, message in cases:
        err = _raw(strict, "AddData", request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, err.details())
        assert message in err.details(), (message, err.details())
    # the same lonely structure is fine when only the paired atoms are selected
    with LearnerClient(strict.address) as c:
        c.wait_ready(120)
        c.add_data(lonely, forces=np.zeros((3, 3)), atom_indices=[0, 1])


def test_a_refused_batch_leaves_the_training_set_unchanged(strict) -> None:
    good = al32(94)
    _, f, _ = emt_labels(good)
    bad = al32(95)
    bad.positions[1] = bad.positions[0] + [0.1, 0, 0]
    with LearnerClient(strict.address) as c:
        c.wait_ready(120)
        before = c.info()
        req = learner_pb2.AddDataBatchRequest()
        req.items.append(_add_request(good, [0, 1], f))
        req.items.append(_add_request(bad, [5]))
        err = _raw(strict, "AddDataBatch", req)
        after = c.info()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[1].structure: atoms 0 (Al) and 1 (Al) are 0.1 Å apart" in err.details()
    assert (after.model_version, after.n_environments, after.n_labels) == \
        (before.model_version, before.n_environments, before.n_labels)


def test_predict_over_the_atom_limit_and_close_atoms_in_a_stream(strict) -> None:
    req = learner_pb2.PredictRequest()
    wire.structure_to_proto(al32(96).repeat((2, 1, 1)), out=req.structure)
    err = _raw(strict, "Predict", req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "structure: 64 atoms; at most 40 accepted (the atom limit)" in err.details()
    # a stream follow-up (positions only) is checked for the minimum distance
    atoms = al32(97)
    first = learner_pb2.PredictRequest(sequence=1)
    wire.structure_to_proto(atoms, out=first.structure)
    clash = learner_pb2.PredictRequest(sequence=2)
    moved = atoms.positions.copy()
    moved[3] = moved[8] + [0.2, 0, 0]
    wire.encode_array(moved, "<f8", clash.structure.positions)
    stub = learner_pb2_grpc.LearnerStub(make_channel(strict.address))
    replies = stub.PredictStream(iter([first, clash]), timeout=30)
    assert next(replies).sequence == 1
    with pytest.raises(grpc.RpcError) as info:
        next(replies)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "atoms 3 (Al) and 8 (Al) are 0.2 Å apart" in info.value.details()


def test_a_sparse_learner_takes_every_force_and_exports_and_loads_by_format(tmp_path) -> None:
    """``model_kind="sparse"`` over gRPC: AddData adds every force of the structure (and its
    energy), atom_indices become inducing environments; the exported file is an ``epicycle-sgp``
    model, and LoadModel into an exact learner serves it as sparse (kind read from the file).
    A checkpoint of the sparse learner is restored by a new learner on the same directory."""
    from learner_service.model import SparseSettings

    cfg = LearnerServiceConfig(species=(13,), cutoffs=(5.0, 3.5), hyperparameters=HYPS, model_kind="sparse",
                               sparse=SparseSettings(max_inducing=5), model_dir=tmp_path / "m")
    sparse = start_learner_server(cfg)
    exact = start_learner_server(LearnerServiceConfig(species=(13,), cutoffs=(5.0, 3.5), hyperparameters=HYPS))
    try:
        with LearnerClient(sparse.address) as c, LearnerClient(exact.address) as e:
            c.wait_ready(120)
            e.wait_ready(120)
            assert c.info().model_kind == "sparse" and e.info().model_kind == "exact"
            for seed, idx in ((1, [0, 5, 10]), (2, [3, 4, 6])):
                atoms = al32(seed)
                en, f, _ = emt_labels(atoms)
                c.add_data(atoms, forces=f, atom_indices=idx, energy=en, use_energy=True)
            info = c.info()
            assert info.n_labels == 2 * (3 * 32 + 1) and info.n_environments == 64
            assert info.n_inducing == 5  # max_inducing caps the second call's three at two
            probe = al32(9)
            p = c.predict(probe)
            cp = c.checkpoint()
            model = c.export_model()
            assert model.format == "epicycle-sgp"
            loaded = e.load_model(model.model)
            assert loaded.model_kind == "sparse" and loaded.n_labels == info.n_labels
            np.testing.assert_array_equal(e.predict(probe).forces, p.forces)
    finally:
        sparse.stop(grace=0)
        exact.stop(grace=0)
    again = start_learner_server(LearnerServiceConfig(model_dir=tmp_path / "m", model_kind="sparse"))
    try:
        with LearnerClient(again.address) as c:
            c.wait_ready(120)
            info = c.info()
            assert info.model_kind == "sparse" and info.checkpoint_id == cp.checkpoint_id
            np.testing.assert_array_equal(c.predict(probe).forces, p.forces)
    finally:
        again.stop(grace=0)
