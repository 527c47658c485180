"""Acquisition rules (coordinator/acquisition.py, issue 14) on hand-built candidates.

The rules consult an in-process model view over a real GaussianProcess (milliseconds, no
gRPC); one test checks that the learner's KernelDistances RPC answers the same as that view.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

from coordinator.acquisition import (ACQUISITION, AcquisitionContext, AcquisitionSettings, Candidate, GPModelView,
                                     LearnerModelView, per_atom_sigma)
from coordinator.config import ConfigError, parse_config
from learner_service.gp import GaussianProcess
from protos.errors import InvalidInput

HYPS = {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05}
CUTOFFS = (5.0, 3.5)
TWINS = (0, 1)


def al32(seed: int, amplitude: float) -> Atoms:
    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))
    atoms.positions += np.random.default_rng(seed).uniform(-amplitude, amplitude, atoms.positions.shape)
    return atoms


def twin_frame() -> Atoms:
    """Perfect fcc Al with nearest neighbours 0 and 1 pushed towards each other: the inversion
    centre between them maps one onto the other, so their environments are the same (d = 0)."""
    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))
    v = atoms.positions[1] - atoms.positions[0]
    atoms.positions[0] += 0.12 * v
    atoms.positions[1] -= 0.12 * v
    return atoms


@pytest.fixture(scope="module")
def gp():
    train = al32(1, 0.08)
    train.calc = EMT()
    model = GaussianProcess([13], CUTOFFS, HYPS)
    model.add_structure(train, forces=train.get_forces(), atom_indices=[3, 12, 25])
    model.train()
    return model


@pytest.fixture(scope="module")
def view(gp):
    return GPModelView(gp)


def candidate(gp, atoms: Atoms) -> Candidate:
    p = gp.predict(atoms)
    return Candidate(atoms, per_atom_sigma(p.force_std, p.atom_std))


def ctx(view, gp=None, seed: int = 0, call_index: int = 1, **settings) -> AcquisitionContext:
    noise = gp.noise if gp is not None else HYPS["noise"]
    return AcquisitionContext(model=view, noise=noise, threshold=noise, call_index=call_index,
                              rng=np.random.default_rng(seed), settings=AcquisitionSettings(**settings))


def select(rule: str, cand: Candidate, context: AcquisitionContext):
    return ACQUISITION[rule]().select(cand, context)


# --------------------------------------------------------------------------- the frame with twins


def test_the_twin_frame_is_what_the_tests_assume(gp, view) -> None:
    cand = candidate(gp, twin_frame())
    top = np.argsort(-cand.sigma)
    assert set(top[:2].tolist()) == set(TWINS), cand.sigma  # the twins are the two most uncertain atoms
    assert abs(cand.sigma[0] - cand.sigma[1]) < 1e-6 * cand.sigma[0]
    dist = view.kernel_distances(cand.atoms)
    assert dist.d_within[0, 1] < 1e-6 and dist.d_train.max() > 0.1


def test_max_sigma_picks_the_largest_sigma(gp, view) -> None:
    cand = candidate(gp, twin_frame())
    sel = select("max_sigma", cand, ctx(view, gp, atoms_per_call=2))
    assert sel.atoms.tolist() == sorted(TWINS)  # the paper's rule labels both copies
    assert sel.frame_score == pytest.approx(cand.sigma.max() / gp.noise)
    # hand-built σ: the n largest, ties to the lower index; no model needed without a bonus
    atoms = Atoms("Al6", positions=np.arange(18.0).reshape(6, 3))
    sigma = np.array([0.0, 0.5, 0.7, 0.0, 0.9, 0.7])
    assert select("max_sigma", Candidate(atoms, sigma), ctx(None, atoms_per_call=2)).order.tolist() == [4, 2]
    assert select("max_sigma", Candidate(atoms, sigma), ctx(None, atoms_per_call=10)).atoms.tolist() == list(range(6))


@pytest.mark.parametrize("rule", ["fps", "info_gain"])
def test_fps_and_info_gain_never_pick_both_twins(gp, view, rule) -> None:
    cand = candidate(gp, twin_frame())
    sel = select(rule, cand, ctx(view, gp, atoms_per_call=2))
    assert len(sel.atoms) == 2
    assert len(set(sel.atoms.tolist()) & set(TWINS)) == 1, sel
    assert sel.order[0] in TWINS  # farthest from the training set / most uncertain first


def test_fps_is_farthest_point_sampling_in_the_kernel_metric(gp, view) -> None:
    cand = candidate(gp, al32(7, 0.3))
    sel = select("fps", cand, ctx(view, gp, atoms_per_call=4))
    d = view.kernel_distances(cand.atoms)
    assert sel.order[0] == int(np.argmax(d.d_train))
    # each later pick maximises min(d_train, d to the picks so far), with that value as its score
    for k in range(1, 4):
        D = np.minimum(d.d_train, d.d_within[sel.order[:k]].min(axis=0))
        D[sel.order[:k]] = -1
        assert sel.order[k] == int(np.argmax(D))
        assert sel.scores[k] == pytest.approx(D.max())
    assert sel.frame_score == pytest.approx(d.d_train.max())


def test_fps_asks_for_the_rows_of_its_picks_never_the_whole_matrix(gp, view) -> None:
    """One question for d_train (no rows), then one row per pick that a later pick needs: with
    k atoms per call k − 1 rows of n distances, where the (n, n) matrix would cost n² kernel
    evaluations (and n² numbers on the wire)."""
    asked = []

    class Spy:
        def kernel_distances(self, atoms, atom_indices=None, rows=None, train=True):
            got = view.kernel_distances(atoms, atom_indices, rows=rows, train=train)
            asked.append((None if rows is None else list(rows), train, np.shape(got.d_within)))
            return got

        def conditional_sigma(self, atoms, condition_on):
            return view.conditional_sigma(atoms, condition_on)

    cand = candidate(gp, al32(7, 0.3))
    for k in (1, 4):
        asked.clear()
        sel = select("fps", cand, ctx(Spy(), gp, atoms_per_call=k))
        assert asked == [([], True, (0, 32))] + [([int(i)], False, (1, 32)) for i in sel.order[:k - 1]]
    # max_sigma with an exploration bonus needs d_train only
    asked.clear()
    select("max_sigma", cand, ctx(Spy(), gp, atoms_per_call=3, exploration_bonus=0.5))
    assert asked == [([], True, (0, 32))]


def test_kernel_distance_rows_are_the_rows_of_the_full_matrix(gp, view) -> None:
    frame = al32(11, 0.3)
    full = view.kernel_distances(frame)
    rows = view.kernel_distances(frame, rows=[5, 0, 31], train=False)
    assert rows.d_train.shape == (0,)
    np.testing.assert_allclose(rows.d_within, full.d_within[[5, 0, 31]], rtol=1e-10, atol=1e-12)
    sub = view.kernel_distances(frame, [3, 9, 20], rows=[20])
    np.testing.assert_allclose(sub.d_within, full.d_within[np.ix_([20], [3, 9, 20])], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sub.d_train, full.d_train[[3, 9, 20]], rtol=1e-12)
    with pytest.raises(InvalidInput, match=r"rows \[4\] are not among the atoms measured"):
        view.kernel_distances(frame, [3, 9], rows=[4])


def test_info_gain_conditioning_lowers_the_twin_sigma(gp, view) -> None:
    cand = candidate(gp, twin_frame())
    sel = select("info_gain", cand, ctx(view, gp, atoms_per_call=2))
    first, second = sel.order
    twin = TWINS[1] if first == TWINS[0] else TWINS[0]
    after = view.conditional_sigma(cand.atoms, [(cand.atoms, [first])])
    assert after[twin] < 0.5 * cand.sigma[twin]             # knowing one copy explains the other
    gain = 0.5 * np.log1p((cand.sigma / gp.noise) ** 2)
    assert sel.scores[0] == pytest.approx(gain.max())
    assert sel.scores[1] == pytest.approx(0.5 * np.log1p((after[second] / gp.noise) ** 2))
    assert sel.scores[1] > 0.5 * np.log1p((after[twin] / gp.noise) ** 2)
    assert sel.frame_score == pytest.approx(sel.scores.sum())


def test_info_gain_asks_for_one_conditioned_prediction_per_pick_after_the_first(gp, view) -> None:
    calls = []

    class Spy:
        def kernel_distances(self, atoms, atom_indices=None, rows=None, train=True):
            return view.kernel_distances(atoms, atom_indices, rows=rows, train=train)

        def conditional_sigma(self, atoms, condition_on):
            calls.append([list(idx) for _, idx in condition_on])
            return view.conditional_sigma(atoms, condition_on)

    cand = candidate(gp, al32(23, 0.3))
    sel = select("info_gain", cand, ctx(Spy(), gp, atoms_per_call=3))
    assert calls == [[sel.order[:1].tolist()], [sel.order[:2].tolist()]]


def test_hybrid_switches_from_fps_to_max_sigma_after_k_calls(gp, view) -> None:
    cand = candidate(gp, al32(9, 0.3))
    fps = select("fps", cand, ctx(view, gp, atoms_per_call=3))
    top = select("max_sigma", cand, ctx(view, gp, atoms_per_call=3))
    assert fps.atoms.tolist() != top.atoms.tolist()  # otherwise the test shows nothing
    for call, rule, want in [(1, "hybrid:fps", fps), (3, "hybrid:fps", fps), (4, "hybrid:max_sigma", top)]:
        sel = select("hybrid", cand, ctx(view, gp, call_index=call, atoms_per_call=3, hybrid_fps_calls=3))
        assert sel.rule == rule and sel.atoms.tolist() == want.atoms.tolist(), call


def test_hybrid_keeps_fps_while_sigma_is_poorly_calibrated(gp, view) -> None:
    """hybrid_max_z2: after K calls hybrid still uses fps while the mean z² of σ at the oracle calls
    exceeds the bound, and switches to max_sigma once it does not (or when nothing is known yet)."""
    import dataclasses

    cand = candidate(gp, al32(9, 0.3))
    base = ctx(view, gp, call_index=10, atoms_per_call=3, hybrid_fps_calls=3, hybrid_max_z2=2.0)
    for z2, rule in [(3.3, "hybrid:fps"), (1.1, "hybrid:max_sigma"), (None, "hybrid:max_sigma")]:
        sel = ACQUISITION["hybrid"]().select(cand, dataclasses.replace(base, calibration_z2=z2))
        assert sel.rule == rule, z2


def test_info_gain_with_a_scaled_view_is_the_information_of_the_calibrated_sigma(gp, view) -> None:
    """calibration.scale: the rules see s·σ — info_gain's first pick scores ½·log(1 + s²σ²/σn²)."""
    from coordinator.acquisition import ScaledModelView

    cand = candidate(gp, al32(11, 0.3))
    s = 2.5
    scaled = Candidate(cand.atoms, s * cand.sigma)
    sel = select("info_gain", scaled, ctx(ScaledModelView(view, s), gp, atoms_per_call=2))
    first = sel.order[0]
    assert sel.scores[0] == pytest.approx(0.5 * np.log1p((s * cand.sigma[first] / gp.noise) ** 2))
    second = sel.order[1]
    cond = view.conditional_sigma(cand.atoms, [(cand.atoms, [first])])
    assert sel.scores[1] == pytest.approx(0.5 * np.log1p((s * cond[second] / gp.noise) ** 2), rel=1e-9)


def test_exploration_bonus_changes_the_ranking_by_its_formula(gp, view) -> None:
    cand = candidate(gp, al32(11, 0.3))
    d = view.kernel_distances(cand.atoms).d_train
    ratio = cand.sigma / gp.noise
    plain = select("max_sigma", cand, ctx(view, gp))
    assert plain.order[0] == int(np.argmax(ratio))
    # the β at which the atom of largest d_min overtakes the atom of largest σ
    a, b = int(np.argmax(ratio)), int(np.argmax(d))
    assert a != b
    beta = 1.5 * (ratio[a] - ratio[b]) / (d[b] - d[a])
    sel = select("max_sigma", cand, ctx(view, gp, exploration_bonus=beta))
    score = ratio + beta * d
    assert sel.order[0] == int(np.argmax(score)) != a
    assert sel.scores[0] == pytest.approx(score.max())
    assert sel.frame_score == pytest.approx(score.max())
    ig = select("info_gain", cand, ctx(view, gp, exploration_bonus=beta))
    assert ig.scores[0] == pytest.approx(np.max(0.5 * np.log1p(ratio ** 2) + beta * d))


def test_add_above_sigma_is_capped_and_species_caps_hold_for_every_rule(gp, view) -> None:
    cand = candidate(gp, al32(13, 0.3))
    x = float(np.quantile(cand.sigma, 0.7))
    above = int((cand.sigma > x).sum())
    assert above >= 6
    sel = select("max_sigma", cand, ctx(view, gp, atoms_per_call=1, add_above_sigma=x))
    assert sel.atoms.tolist() == sorted(np.flatnonzero(cand.sigma > x).tolist())
    capped = select("max_sigma", cand, ctx(view, gp, atoms_per_call=1, add_above_sigma=x, max_atoms_per_call=4))
    assert capped.order.tolist() == np.argsort(-cand.sigma)[:4].tolist()
    few = select("max_sigma", cand, ctx(view, gp, atoms_per_call=2, add_above_sigma=10 * cand.sigma.max()))
    assert len(few.atoms) == 2  # nothing above X: atoms_per_call still
    # per-species caps, on a two-species frame, for every rule
    mixed = cand.atoms.copy()
    mixed.numbers[::2] = 29
    mixed.numbers[1::4] = 79
    sigma = np.linspace(0.1, 1.0, len(mixed))
    caps = {29: 2, 79: 1}
    for rule in ACQUISITION:
        c = AcquisitionContext(model=_FakeView(len(mixed)), noise=0.05, threshold=0.05,
                               settings=AcquisitionSettings(atoms_per_call=6, max_atoms_per_species=caps))
        s = select(rule, Candidate(mixed, sigma), c)
        z = mixed.numbers[s.atoms]
        assert (z == 29).sum() <= 2 and (z == 79).sum() <= 1 and len(s.atoms) == 6, (rule, z)


def test_deterministic_given_the_generator(gp, view) -> None:
    cand = candidate(gp, al32(15, 0.3))
    for rule in ACQUISITION:
        a = select(rule, cand, ctx(view, gp, seed=4, atoms_per_call=3))
        b = select(rule, cand, ctx(view, gp, seed=4, atoms_per_call=3))
        assert a.order.tolist() == b.order.tolist() and len(set(a.order.tolist())) == 3, rule
    draws = {tuple(select("random", cand, ctx(view, gp, seed=s, atoms_per_call=3)).atoms) for s in range(5)}
    assert len(draws) > 1


def test_large_frames_measure_distances_for_their_most_uncertain_atoms(gp, view, monkeypatch) -> None:
    import coordinator.acquisition as acquisition

    cand = candidate(gp, al32(19, 0.3))
    asked = []

    class Spy:
        def kernel_distances(self, atoms, atom_indices=None, rows=None, train=True):
            asked.append(atom_indices)
            return view.kernel_distances(atoms, atom_indices, rows=rows, train=train)

    monkeypatch.setattr(acquisition, "MAX_DISTANCE_ATOMS", 8)
    sel = select("fps", cand, ctx(Spy(), gp, atoms_per_call=3))
    top = sorted(np.argsort(-cand.sigma)[:8].tolist())
    assert asked == [top] * 3  # d_train, then the rows of the first two picks
    assert set(sel.atoms.tolist()) <= set(top)
    # the same as fps on the eight atoms alone
    sub = view.kernel_distances(cand.atoms, top)
    first = top[int(np.argmax(sub.d_train))]
    assert sel.order[0] == first


def test_bad_inputs_are_named() -> None:
    atoms = Atoms("Al2", positions=[[0, 0, 0], [2, 0, 0]])
    with pytest.raises(InvalidInput, match=r"shape \(2,\)"):
        Candidate(atoms, np.zeros(3))
    with pytest.raises(InvalidInput, match="max_atoms_per_call"):
        AcquisitionSettings(atoms_per_call=3, max_atoms_per_call=2)
    with pytest.raises(InvalidInput, match="needs a model view"):
        select("fps", Candidate(atoms, np.ones(2)), AcquisitionContext(model=None, noise=0.05, threshold=0.05))


class _FakeView:
    """Distances/σ that make every atom look new (only for the cap test, which is about counting)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def kernel_distances(self, atoms, atom_indices=None, rows=None, train=True):
        from coordinator.acquisition import KernelDistances

        full = np.ones((self.n, self.n)) - np.eye(self.n)
        return KernelDistances(np.ones(self.n) if train else np.zeros(0),
                               full if rows is None else full[list(rows)])

    def conditional_sigma(self, atoms, condition_on):
        return np.full(self.n, 0.5)


# --------------------------------------------------------------------------- configuration


def test_config_validates_the_acquisition_knobs() -> None:
    ok = parse_config({"policy": {"acquisition": "hybrid", "hybrid_fps_calls": 3, "exploration_bonus": 0.5,
                                  "add_above_sigma": 0.2, "max_atoms_per_call": 5, "atoms_per_call": 2,
                                  "max_atoms_per_species": {"Cu": 2, "Au": 1}}})
    s = AcquisitionSettings.from_policy(ok.policy)
    assert s.max_atoms_per_species == {29: 2, 79: 1} and s.hybrid_fps_calls == 3 and s.add_above_sigma == 0.2
    for policy, message in [
        ({"acquisition": "ucb"}, "policy.acquisition: allowed fps, hybrid, info_gain, max_sigma, random"),
        ({"add_above_sigma": 0}, "policy.add_above_sigma: must be > 0 eV/Å"),
        ({"atoms_per_call": 3, "max_atoms_per_call": 2}, "policy.max_atoms_per_call: must be >= policy.atoms_per_call"),
        ({"max_atoms_per_species": {"Cx": 1}}, "'Cx' is not a chemical symbol"),
        ({"max_atoms_per_species": {"Cu": 0}}, r"policy.max_atoms_per_species.Cu: must be an integer >= 1"),
        ({"exploration_bonus": -1}, "policy.exploration_bonus: must be >= 0"),
        ({"hybrid_fps_calls": -1}, "policy.hybrid_fps_calls: must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config({"policy": policy})


# --------------------------------------------------------------------------- over real gRPC


def test_the_kernel_distances_rpc_answers_as_the_in_process_view(gp, view) -> None:
    from learner_service.client import LearnerClient
    from learner_service.server import LearnerServiceConfig, start_learner_server

    running = start_learner_server(LearnerServiceConfig(species=(13,), cutoffs=CUTOFFS, hyperparameters=HYPS,
                                                        predict_threads=1))
    try:
        with LearnerClient(running.address) as client:
            client.wait_ready(300)
            remote = LearnerModelView(client)
            frame = al32(17, 0.3)
            empty = remote.kernel_distances(frame, [0, 5])
            assert np.isinf(empty.d_train).all()
            train = al32(1, 0.08)
            train.calc = EMT()
            client.add_data(train, forces=train.get_forces(), atom_indices=[3, 12, 25])
            for idx, rows, train in ((None, None, True), ([4, 0, 9], None, True), ([4, 0, 9], [9], False),
                                     (None, [], True)):
                got = remote.kernel_distances(frame, idx, rows=rows, train=train)
                want = view.kernel_distances(frame, idx, rows=rows, train=train)
                assert got.d_within.shape == want.d_within.shape and got.d_train.shape == want.d_train.shape
                np.testing.assert_allclose(got.d_train, want.d_train, rtol=1e-12, atol=0)
                np.testing.assert_allclose(got.d_within, want.d_within, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(remote.conditional_sigma(frame, [(frame, [2])]),
                                       view.conditional_sigma(frame, [(frame, [2])]), rtol=1e-9)
            # the same selection through either view
            cand = candidate(gp, frame)
            for rule in ("fps", "info_gain"):
                a = select(rule, cand, ctx(remote, gp, atoms_per_call=3))
                b = select(rule, cand, ctx(view, gp, atoms_per_call=3))
                assert a.order.tolist() == b.order.tolist(), rule
            with pytest.raises(InvalidInput, match="atom_indices: atom index 40 is out of range"):
                client.kernel_distances(frame, [40])
            import learner_service.servicer as servicer

            with pytest.raises(InvalidInput, match=r"within.atoms \[7\] are not among the atoms measured"):
                client.kernel_distances(frame, [0, 1], rows=[7])
            limit = servicer.MAX_KERNEL_DISTANCE_ENTRIES
            servicer.MAX_KERNEL_DISTANCE_ENTRIES = 16
            try:
                with pytest.raises(InvalidInput, match="d_within would have 5 x 5 entries; at most 16 per request"):
                    client.kernel_distances(frame, [0, 1, 2, 3, 4])
                # one row of many atoms fits where the square matrix does not
                assert client.kernel_distances(frame, list(range(16)), rows=[3])[1].shape == (1, 16)
            finally:
                servicer.MAX_KERNEL_DISTANCE_ENTRIES = limit
    finally:
        running.stop(grace=0)


# --------------------------------------------------------------------------- the cycle's queue ranking


def _queued(seq: int, atoms: Atoms, force_std: np.ndarray, threshold: float):
    from coordinator.rundir import QueuedFrame

    n = len(atoms)
    return QueuedFrame(seq=seq, walker=f"w{seq}", step=10, time_fs=50.0, temperature_K=300.0,
                       positions=atoms.positions, numbers=atoms.numbers, cell=atoms.cell.array, pbc=atoms.pbc,
                       force_std=force_std, predicted_forces=np.zeros((n, 3)), selection=[0], checkpoint=b"",
                       model_version=1, max_sigma=float(force_std.max()), threshold=threshold)


def _queue_only_run(gp, rule: str, queued: dict, sent: list):
    """An OnTheFlyRun with only what _dispatch and _drop_known touch (no services, no run directory)."""
    from coordinator.cycle import OnTheFlyRun
    from coordinator.rundir import RunState

    run = OnTheFlyRun.__new__(OnTheFlyRun)
    run.config = parse_config({"policy": {"acquisition": rule}})
    run.acquisition = ACQUISITION[rule]()
    run.learner = gp  # has kernel_distances and predict(condition_on=) like LearnerClient
    run.noise = run.threshold = gp.noise
    from coordinator.calibration import OnlineCalibration

    run.calibration, run.scale = OnlineCalibration(), 1.0
    run.stopping = ""
    run.state = RunState(oracle_calls=3)
    run.max_in_flight = 1
    run.in_flight = {}
    run.queued = dict(queued)
    run.metrics = None
    run.events_logged = []
    run.rd = type("RD", (), {"event": lambda self, name, **kw: run.events_logged.append((name, kw)),
                             "remove_queue_entry": lambda self, seq: None})()
    run._save = lambda: None
    run._queue_gauges = lambda: None
    run._send = sent.append
    run._start_chunk = lambda w: None
    run.walkers = {"w0": None, "w1": None}
    return run


@pytest.mark.parametrize("rule, first", [("max_sigma", 0), ("fps", 1)])
def test_dispatch_labels_the_frame_of_largest_frame_score_first(gp, rule, first) -> None:
    """Frame 0: close to the training data but with the larger stored σ; frame 1: far from it.
    ``max_sigma`` sends frame 0 first (σ/threshold, as before), ``fps`` frame 1 (largest d_min)."""
    near, far = al32(1, 0.09), al32(21, 0.35)
    sent = []
    run = _queue_only_run(gp, rule, {0: _queued(0, near, np.full((32, 3), 0.9), gp.noise),
                                     1: _queued(1, far, np.full((32, 3), 0.3), gp.noise)}, sent)
    d_near = gp.kernel_distances(near)[0].max()
    d_far = gp.kernel_distances(far)[0].max()
    assert d_far > 1.5 * d_near
    run._dispatch()
    assert sent == [first]
    assert list(run.queued) == [1 - first]


# --------------------------------------------------------------------------- a whole run, real services

RUN = {
    "name": "acq", "seed": 5,
    "structure": {"generator": "fcc", "element": "Al", "a": 4.05, "repeat": [2, 2, 2], "rattle": 0.02},
    "oracle": {"backend": "emt"},
    "learner": {"cutoffs": list(CUTOFFS), "hyperparameters": HYPS},
    "sampler": {"ensemble": "nve", "timestep_fs": 5.0, "temperature_K": 600.0, "steps": 60, "frame_interval": 5,
                "checkpoint_interval": 20},
    "policy": {"sigma_factor": 1.0, "initial_atoms": 4, "atoms_per_call": 2, "acquisition": "hybrid",
               "hybrid_fps_calls": 2, "max_atoms_per_call": 3},
}


def test_a_run_with_hybrid_acquisition_over_real_services(tmp_path) -> None:
    """fps for oracle calls 1..2 then max_sigma, two distinct atoms per call, each logged with its
    scores; the training set holds exactly the atoms the acquisition picked."""
    import yaml

    from coordinator.cycle import OnTheFlyRun, Progress, run_species
    from coordinator.rundir import RunDirectory
    from coordinator.services import start_services

    config = parse_config(RUN)
    rd = RunDirectory.create(tmp_path / "run", yaml.safe_dump(config.to_dict()))
    services = start_services(config, run_species(config), learner_dir=rd.path / "learner")
    try:
        state = OnTheFlyRun(config, rd, services, Progress(config.sampler.steps, 5.0, quiet=True)).run()
    finally:
        services.close()
        rd.close()
    queued = [e for e in rd.events() if e["event"] == "frame_queued"]
    assert state.oracle_calls >= 4 and len(queued) == state.oracle_calls - 1
    assert [e["acquisition"] for e in queued[:3]] == ["hybrid:fps", "hybrid:fps", "hybrid:max_sigma"]
    for e in queued:
        assert len(set(e["selection"])) == 2 == len(e["selection_scores"])
        assert sorted(e["selection_order"]) == e["selection"]
        if e["acquisition"] == "hybrid:max_sigma":
            assert e["frame_score"] == pytest.approx(e["max_sigma"] / e["threshold"], rel=1e-6)
    assert state.training_atoms[1:] == [e["selection"] for e in queued]


def test_a_model_update_reranks_the_queue_and_drops_what_it_knows(gp) -> None:
    """After an update _drop_known predicts every queued frame again: those still uncertain are
    ranked by their new σ, those below the threshold are dropped — counted, with an event."""
    near, far = al32(1, 0.09), al32(21, 0.35)
    p_near, p_far = gp.predict(near), gp.predict(far)
    s_near = per_atom_sigma(p_near.force_std, p_near.atom_std).max()
    s_far = per_atom_sigma(p_far.force_std, p_far.atom_std).max()
    assert s_far > 1.2 * s_near
    stored = {0: _queued(0, near, np.full((32, 3), 0.9), gp.noise), 1: _queued(1, far, np.full((32, 3), 0.3),
                                                                                   gp.noise)}
    for q in stored.values():
        q.walker = f"w{q.seq}"
    sent = []
    run = _queue_only_run(gp, "max_sigma", stored, sent)
    run.threshold = 0.5 * s_near  # both still uncertain: re-ranked by the σ the model now predicts
    assert run._frame_score(0) > run._frame_score(1)  # from the σ stored with the frames: near first
    run._drop_known()
    assert run._frame_scores()[1] > run._frame_scores()[0]  # the new σ: far first
    assert run._frame_scores()[1] == pytest.approx(s_far / run.threshold)
    run.max_in_flight = 1
    run._dispatch()
    assert sent == [1]
    run.threshold = 1.1 * s_near  # the near frame is now known: dropped, counted, logged
    run._drop_known()
    assert run.queued == {} and run.state.counters == {"dropped": 1}
    assert [name for name, _ in run.events_logged] == ["frame_dropped"]
