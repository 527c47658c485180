"""Checkpoint, RestoreCheckpoint, AddDataBatch and conditioned σ over real gRPC on 127.0.0.1."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from ase.calculators.emt import EMT

from learner_service.client import LearnerClient
from learner_service.server import LearnerServiceConfig, start_learner_server
from protos import errors, wire
from protos.client import make_channel
from protos.epicycle.v1 import learner_pb2, learner_pb2_grpc
from .test_grpc_learner import HYPS, al32

MAX_MESSAGE = 4 * 1024 * 1024  # the on-the-fly goal: no message over 4 MiB


def labelled(seed: int, idx, **flags) -> dict:
    atoms = al32(seed, amplitude=0.15)
    calc = atoms.copy()
    calc.calc = EMT()
    return dict(atoms=atoms, forces=calc.get_forces(), atom_indices=list(idx), energy=calc.get_potential_energy(),
                stress=calc.get_stress(), **flags)


def start(model_dir=None, **kw):
    running = start_learner_server(LearnerServiceConfig(species=(13,), cutoffs=(5.0, 3.5), hyperparameters=HYPS,
                                                        model_dir=model_dir, **kw))
    client = LearnerClient(running.address)
    client.wait_ready(120)
    return running, client


def test_a_new_server_on_the_model_directory_predicts_bit_for_bit(tmp_path) -> None:
    running, c = start(tmp_path / "model")
    try:
        assert c.info().checkpoint_id == ""
        c.add_data(**labelled(0, [0, 1, 2]))
        c.optimize(max_iterations=3, space="linear")
        c.add_data_batch([labelled(1, [3, 4]), labelled(2, [5], use_energy=True, use_stress=True)])
        c.add_data(**labelled(3, [6, 7]))
        reply = c.checkpoint()
        assert reply.checkpoint_id == "000001" and reply.n_environments == 8 and reply.bytes_written > 0
        assert c.info().checkpoint_id == "000001"
        test = al32(50, amplitude=0.2)
        before = c.predict(test, stress=True)
        info = c.info()
    finally:
        c.close()
        running.stop(grace=0)  # as a kill: nothing is written at shutdown
    running, c = start(tmp_path / "model")
    try:
        after = c.predict(test, stress=True)
        again = c.info()
        assert again.checkpoint_id == "000001" and again.n_labels == info.n_labels
        assert {h.name: h.value for h in again.hyperparameters} == {h.name: h.value for h in info.hyperparameters}
        for name in ("forces", "force_std", "stress"):
            assert np.array_equal(getattr(before, name), getattr(after, name)), name
        assert before.energy == after.energy
    finally:
        c.close()
        running.stop(grace=0)


def test_restore_checkpoint_rolls_back_later_data(tmp_path) -> None:
    running, c = start(tmp_path / "model")
    try:
        c.add_data(**labelled(0, [0, 1]))
        first = c.checkpoint().checkpoint_id
        test = al32(51)
        at_first = c.predict(test)
        c.add_data_batch([labelled(1, [2, 3]), labelled(2, [4])])
        assert c.info().n_environments == 5
        info = c.restore_checkpoint(first)
        assert info.n_environments == 2 and info.checkpoint_id == first
        back = c.predict(test)
        assert back.model_version == info.model_version
        assert np.array_equal(back.forces, at_first.forces) and np.array_equal(back.force_std, at_first.force_std)
        c.add_data(**labelled(3, [9]))
        assert c.checkpoint().checkpoint_id == "000002"
        assert c.restore_checkpoint("initial").n_labels == 0
        with pytest.raises(errors.NotFound):
            c.restore_checkpoint("000099")
        with pytest.raises(errors.NotFound, match="superseded"):
            c.restore_checkpoint("000002")
    finally:
        c.close()
        running.stop(grace=0)


def test_checkpoint_without_model_dir_is_failed_precondition() -> None:
    running, c = start(None)
    try:
        stub = learner_pb2_grpc.LearnerStub(make_channel(running.address))
        with pytest.raises(grpc.RpcError) as exc:
            stub.Checkpoint(learner_pb2.CheckpointRequest(), timeout=30)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--model-dir" in exc.value.details()
        with pytest.raises(grpc.RpcError) as exc:
            stub.RestoreCheckpoint(learner_pb2.RestoreCheckpointRequest(checkpoint_id="000001"), timeout=30)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        c.close()
        running.stop(grace=0)


def test_add_data_batch_equals_one_by_one_with_one_version_bump_and_is_all_or_nothing() -> None:
    items = [labelled(s, [s, s + 3, 20]) for s in range(3)] + [labelled(4, [1], use_energy=True)]
    one, c1 = start(None)
    batch, c2 = start(None)
    try:
        for it in items:
            c1.add_data(**it)
        v0 = c2.info().model_version
        bad = dict(items[1], atom_indices=[40])
        with pytest.raises(errors.InvalidInput, match=r"items\[1\]\.atom_indices"):
            c2.add_data_batch([items[0], bad])
        assert c2.info().model_version == v0 and c2.info().n_labels == 0
        reply = c2.add_data_batch(items)
        assert reply.model_version == v0 + 1 and reply.n_environments == 10 and reply.n_labels == 31
        test = al32(52)
        a, b = c1.predict(test), c2.predict(test)
        np.testing.assert_allclose(a.forces, b.forces, rtol=0, atol=1e-10)
        np.testing.assert_allclose(a.force_std, b.force_std, rtol=0, atol=1e-10)
    finally:
        for c, r in ((c1, one), (c2, batch)):
            c.close()
            r.stop(grace=0)


def test_conditioned_sigma_over_grpc_and_messages_stay_small(tmp_path) -> None:
    """A model of a few hundred environments: no request or response of the flows over 4 MiB."""
    running, c = start(tmp_path / "model")
    stub = learner_pb2_grpc.LearnerStub(make_channel(running.address))
    sizes = {}

    def call(name, request):
        reply = getattr(stub, name)(request, timeout=600)
        sizes[name] = max(sizes.get(name, 0), request.ByteSize(), reply.ByteSize())
        return reply

    try:
        for k in range(10):  # 10 batches of 3 frames x 10 environments = 300 environments
            req = learner_pb2.AddDataBatchRequest()
            for s in range(3):
                req.items.append(LearnerClient.add_data_request(**labelled(100 + 3 * k + s, range(0, 30, 3))))
            call("AddDataBatch", req)
        ck = call("Checkpoint", learner_pb2.CheckpointRequest())
        assert ck.n_environments == 300
        test = al32(60, amplitude=0.3)
        queued = [(al32(61, amplitude=0.3), [0, 5]), (test, [7])]
        p = learner_pb2.PredictRequest()
        wire.structure_to_proto(test, out=p.structure, velocities=False)
        for atoms, idx in queued:
            cond = p.condition_on.add(atom_indices=idx)
            wire.structure_to_proto(atoms, out=cond.structure, velocities=False)
        call("Predict", p)
        call("GetModelInfo", learner_pb2.GetModelInfoRequest())
        call("RestoreCheckpoint", learner_pb2.RestoreCheckpointRequest(checkpoint_id=ck.checkpoint_id))
        assert max(sizes.values()) < MAX_MESSAGE, sizes
        plain = c.predict(test)
        conditioned = c.predict(test, condition_on=queued)
        assert np.array_equal(plain.forces, conditioned.forces)
        assert np.all(conditioned.force_std <= plain.force_std + 1e-12)
        # one noisy observation of environment 7: var -> var σn² / (var + σn²) (its own force components)
        var = plain.force_std[7] ** 2
        assert np.all(conditioned.force_std[7] < np.sqrt(var * HYPS["noise"] ** 2 / (var + HYPS["noise"] ** 2)) + 1e-3)
        assert np.all(conditioned.force_std[7] < plain.force_std[7] - 1e-3)
        with pytest.raises(errors.InvalidInput, match=r"condition_on\[0\]\.atom_indices"):
            c.predict(test, condition_on=[(test, [99])])
    finally:
        c.close()
        running.stop(grace=0)


def test_while_a_checkpoint_is_rebuilt_rpcs_are_unavailable_and_info_not_ready(tmp_path) -> None:
    """start_learner_server listens before it rebuilds the latest checkpoint (minutes at
    5,000 environments; health NOT_SERVING meanwhile); RPCs then answer UNAVAILABLE."""
    running, c = start(tmp_path / "model")
    try:
        c.add_data(**labelled(0, [0, 1]))
        c.checkpoint()
        running.model_store.loading = "the learner is rebuilding checkpoint 000001"
        assert c.info().ready is False
        with pytest.raises(errors.NotReady, match="rebuilding"):
            c.predict(al32(3))
        with pytest.raises(errors.NotReady):
            c.add_data(**labelled(1, [2]))
        running.model_store.loading = None
        assert c.info().ready is True and c.info().n_environments == 2
    finally:
        c.close()
        running.stop(grace=0)


def test_held_versions_keep_predicting_as_they_did_and_others_are_not_found(tmp_path) -> None:
    """HoldVersions (policy.update: trial): a walker pinned to a version gets exactly that model's
    predictions after later updates; a version nobody holds is gone (NOT_FOUND, naming what is held),
    and a pinned PredictStream request is answered by the pinned model."""
    running, c = start()
    try:
        c.add_data(**labelled(0, [0, 1]))
        v1 = c.info().model_version
        test = al32(52, amplitude=0.2)
        at_v1 = c.predict(test)
        held = c.hold_versions([v1])
        assert list(held.held) == [] and list(held.missing) == [] and held.newest == v1  # v1 is the newest
        c.add_data(**labelled(1, [2, 3]))
        v2 = c.info().model_version
        c.add_data(**labelled(2, [4]))
        v3 = c.info().model_version
        assert v1 < v2 < v3
        pinned = c.predict(test, model_version=v1)
        assert pinned.model_version == v1
        assert np.array_equal(pinned.forces, at_v1.forces) and np.array_equal(pinned.force_std, at_v1.force_std)
        newest = c.predict(test)
        assert newest.model_version == v3 and not np.array_equal(newest.forces, at_v1.forces)
        with pytest.raises(errors.NotFound, match=f"model version {v2} is not held.*held: {v1}"):
            c.predict(test, model_version=v2)
        stream = c.stream(timeout=30)
        try:
            p = stream.predict(test.positions, test.numbers, test.cell.array, test.pbc, model_version=v1)
            assert p.model_version == v1 and np.array_equal(p.forces, at_v1.forces)
            p = stream.predict(test.positions, test.numbers, test.cell.array, test.pbc)
            assert p.model_version == v3
        finally:
            stream.close()
        released = c.hold_versions([v3, v2])
        assert list(released.held) == [] and list(released.missing) == [v2] and released.newest == v3
        with pytest.raises(errors.NotFound):
            c.predict(test, model_version=v1)
    finally:
        c.close()
        running.stop(grace=0)
