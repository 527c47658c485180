"""The selection rule of map_optimize (issue 13): candidates scored by leave-one-frame-out
cross-validation, never one worse than the start values on that criterion."""

import math

import numpy as np
import pytest

from learner_service.datasets import perturbed_fcc_al
from learner_service.defaults import DEFAULT_HYPERPARAMETERS
from learner_service.gp import GaussianProcess
from learner_service.model_selection import (_Counter, _fold_score, _KernelSource, block_cv_metrics, cv_blocks,
                                             lofo_metrics, map_optimize, reciprocal_bonds, row_frames, training_frames,
                                             validation_metrics)
from protos.errors import InvalidInput

CUT = (5.0, 3.5)


def _gp(frames, atoms=range(12), hyps=None):
    gp = GaussianProcess([13], CUT, dict(hyps or DEFAULT_HYPERPARAMETERS))
    for f in frames:
        gp.add_structure(f, forces=f.get_forces(), atom_indices=list(atoms))
    return gp


def _from_file(gp, path):
    """The same model saved and loaded: it keeps its environments, not the structures they came from."""
    gp.save(path)
    back = GaussianProcess.load(path)
    assert back.labelled_frames() is None
    return back


def test_training_frames_are_the_structures_the_model_was_given(tmp_path):
    frames = perturbed_fcc_al(3, seed=2)
    gp = _gp(frames, atoms=[0, 1, 2, 3])
    gp.add_structure(frames[0], forces=frames[0].get_forces(), atom_indices=[5])  # frame 0 again: a new call
    assert training_frames(gp).tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3]
    single = _gp(perturbed_fcc_al(3, seed=4), atoms=[7])
    assert training_frames(single).tolist() == [0, 1, 2]


def test_training_frames_are_recovered_from_the_environments(tmp_path):
    """A model from a file: environments of one structure share reciprocal bonds (i->j and j->i at
    the same distance); different frames do not.  One atom per frame: one frame per atom."""
    frames = perturbed_fcc_al(3, seed=2)
    gp = _gp(frames, atoms=[0, 1, 2, 3])
    loaded = _from_file(gp, tmp_path / "a.npz")
    assert training_frames(loaded).tolist() == [0] * 4 + [1] * 4 + [2] * 4 == training_frames(gp).tolist()
    assert row_frames(loaded).tolist() == [0] * 12 + [1] * 12 + [2] * 12
    gp.add_structure(frames[0], forces=frames[0].get_forces(), atom_indices=[3])  # frame 0 again: same structure
    assert training_frames(_from_file(gp, tmp_path / "b.npz"))[-1] == 0
    single = _from_file(_gp(perturbed_fcc_al(3, seed=4), atoms=[7]), tmp_path / "c.npz")
    assert training_frames(single).tolist() == [0, 1, 2]
    # many frames of the same cell: atom pairs repeat with nearly equal distances; the key is the
    # bond vector, so none merge (with the distance alone to 1e-6 Å, 160 frames merged into 112)
    many = _from_file(_gp(perturbed_fcc_al(160, seed=3), atoms=range(32)), tmp_path / "d.npz")
    assert np.array_equal(training_frames(many), np.repeat(np.arange(160), 32))


def test_closed_form_leave_one_frame_out_equals_refitting_without_the_frame():
    """Block LOO (A = (K_y^-1)_II: residual A^-1 α_I, covariance A^-1) gives exactly the
    prediction of a GP trained on the other frames (same hyperparameters): RMSE and mean log
    predictive density per held-out frame."""
    frames = perturbed_fcc_al(3, seed=21)
    hyps = dict(DEFAULT_HYPERPARAMETERS, ls2=0.5, noise=0.01)
    gp = _gp(frames, hyps=hyps)
    kern = _KernelSource(gp, None, 0).build([hyps["ls2"], hyps["ls3"]], _Counter())
    folds = lofo_metrics(kern, gp.hyperparameters, kern.frames)
    assert [f["frame"] for f in folds] == ["frame 0", "frame 1", "frame 2"]
    for k, fold in enumerate(folds):
        other = _gp([f for j, f in enumerate(frames) if j != k], hyps=hyps)
        ref = validation_metrics(other, [(frames[k], range(12), frames[k].get_forces())])
        assert fold["rmse"] == pytest.approx(ref["rmse"], rel=1e-6)
        assert fold["max_error"] == pytest.approx(ref["max_error"], rel=1e-6)
        assert fold["nlpd"] == pytest.approx(-ref["log_likelihood"], rel=1e-6)
    one = _gp(frames[:1], hyps=hyps)
    k1 = _KernelSource(one, None, 0).build([hyps["ls2"], hyps["ls3"]], _Counter())
    assert lofo_metrics(k1, one.hyperparameters, k1.frames) is None  # one frame: nothing to hold out


def test_fold_scores():
    folds = [{"rmse": 0.01, "max_error": 0.05, "nlpd": -3.0, "components": 30},
             {"rmse": 0.03, "max_error": 0.04, "nlpd": -1.0, "components": 10}]
    assert _fold_score(folds, "worst") == 0.03
    assert _fold_score(folds, "max_error") == 0.05
    assert _fold_score(folds, "rmse") == pytest.approx(math.sqrt((30 * 1e-4 + 10 * 9e-4) / 40))
    assert _fold_score(folds, "nlpd") == pytest.approx(-2.5)
    assert _fold_score([], "worst") is None


def test_cross_validation_rejects_the_maximum_that_does_not_extrapolate():
    """Three frames at ±2 % displacements and one at ±6 %: the highest MAP objective is a short
    length scale fitted to the small displacements, which predicts the ±6 % frame badly
    (leave-one-frame-out sees it).  Test frames at ±6 %: the cross-validated choice predicts
    them better than the objective's choice and no worse than the start values."""
    train = perturbed_fcc_al(3, seed=31, delta=0.02) + perturbed_fcc_al(1, seed=32, delta=0.06)
    test = [(f, range(32), f.get_forces()) for f in perturbed_fcc_al(6, seed=33, delta=0.06)]
    cv = _gp(train)
    res = map_optimize(cv, restarts=2, seed=0)
    by_objective = _gp(train)
    ref = map_optimize(by_objective, restarts=2, seed=0, selection="objective")
    assert ref.selected != res.selected
    rmse_cv = validation_metrics(cv, test)["rmse"]
    rmse_obj = validation_metrics(by_objective, test)["rmse"]
    rmse_start = validation_metrics(_gp(train), test)["rmse"]
    assert rmse_cv < 0.75 * rmse_obj, (rmse_cv, rmse_obj)
    assert rmse_cv < 1.05 * rmse_start, (rmse_cv, rmse_start)
    rep = res.validation
    assert rep["selected"] == res.selected and rep["criterion"] == "worst"
    # the objective's choice is a candidate with a higher objective and a worse held-out frame
    best_obj = max((c for c in rep.values() if isinstance(c, dict)), key=lambda c: c["objective"])
    assert best_obj["worst_rmse"] > rep[res.selected]["worst_rmse"]
    assert len(rep[res.selected]["folds"]) == 4


@pytest.mark.parametrize("seed,criterion", [(1, "worst"), (2, "nlpd"), (3, "rmse")])
def test_selection_is_never_worse_than_the_start_values_on_its_criterion(seed, criterion):
    gp = _gp(perturbed_fcc_al(3, seed=40 + seed), atoms=range(8))
    res = map_optimize(gp, restarts=2, seed=seed, criterion=criterion, max_iterations=8)
    rep = res.validation
    scores = {k: c["score"] for k, c in rep.items() if isinstance(c, dict)}
    assert scores[res.selected] <= scores["start values"]
    if res.selected != "start values":  # the best, and better than the start values by the 2 % margin
        assert scores[res.selected] == min(scores.values())
        assert scores[res.selected] <= scores["start values"] - 0.02 * abs(scores["start values"])
    else:
        assert res.hyperparameters == pytest.approx({k: DEFAULT_HYPERPARAMETERS[k] for k in res.hyperparameters})


def test_held_out_frames_join_the_cross_validation_folds():
    frames = perturbed_fcc_al(3, seed=8)
    gp = _gp(frames[:2])
    held = [(frames[2], range(12), frames[2].get_forces())]
    res = map_optimize(gp, restarts=1, seed=0, validation=held, max_iterations=6)
    folds = res.validation["start values"]["folds"]
    assert [f["frame"] for f in folds] == ["frame 0", "frame 1", "held out"]
    start_gp = _gp(frames[:2])
    assert folds[2]["rmse"] == pytest.approx(validation_metrics(start_gp, held)["rmse"], rel=1e-9)


def test_one_frame_keeps_the_start_values_and_says_why():
    """One frame: no frame can be held out (held-out atoms of the trained frame share its pair
    distances and pass hyperparameters that fail on new frames), so the start values stay."""
    gp = _gp(perturbed_fcc_al(1, seed=9), atoms=range(16))
    res = map_optimize(gp, restarts=2, seed=0, max_iterations=8)
    assert res.selected == "start values"
    assert res.hyperparameters == pytest.approx({k: DEFAULT_HYPERPARAMETERS[k] for k in res.hyperparameters})
    assert any("no out-of-frame check" in w for w in res.warnings)
    assert gp.log_likelihood() == pytest.approx(res.log_likelihood)
    with pytest.raises(InvalidInput, match="criterion"):
        map_optimize(gp, criterion="median")
    with pytest.raises(InvalidInput, match="selection"):
        map_optimize(gp, selection="vote")
    assert np.isfinite(res.log_likelihood)


def test_closest_pair_block_equals_refitting_without_both_atoms():
    """The optional extrapolation block (extrapolation=True) holds out the force rows of the two
    closest labelled atoms of a frame together: closed form = a GP trained without them."""
    frames = perturbed_fcc_al(2, seed=12)
    hyps = dict(DEFAULT_HYPERPARAMETERS, ls2=0.6, noise=0.01)
    gp = _gp(frames, atoms=range(10), hyps=hyps)
    kern = _KernelSource(gp, None, 0, extrapolation=True).build([hyps["ls2"], hyps["ls3"]], _Counter())
    pair_blocks = [b for b in kern.blocks if b[0].startswith("closest pair of frame 0")]
    assert len(pair_blocks) == 1 and len(pair_blocks[0][1]) == 6
    a, b, r = reciprocal_bonds(gp)
    first = (a < 10) & (b < 10)
    k = int(np.argmin(np.where(first, r, np.inf)))
    x, y = int(a[k]), int(b[k])
    assert pair_blocks[0][1].tolist() == sorted(list(range(3 * x, 3 * x + 3)) + list(range(3 * y, 3 * y + 3)))
    fold = block_cv_metrics(kern, gp.hyperparameters, pair_blocks)[0]
    other = GaussianProcess([13], CUT, hyps)
    other.add_structure(frames[0], forces=frames[0].get_forces(), atom_indices=[i for i in range(10) if i not in (x, y)])
    other.add_structure(frames[1], forces=frames[1].get_forces(), atom_indices=range(10))
    ref = validation_metrics(other, [(frames[0], [x, y], frames[0].get_forces())])
    assert fold["rmse"] == pytest.approx(ref["rmse"], rel=1e-6)
    assert fold["nlpd"] == pytest.approx(-ref["log_likelihood"], rel=1e-6)
    frames_only = cv_blocks(kern.frames, np.where(kern.kinds == 0, 0, -1), None, extrapolation=False)
    assert [lab for lab, _ in frames_only] == ["frame 0", "frame 1"]
