"""Loud model warnings (issue 13, item 4): each case constructed, and a clean model silent."""

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from learner_service.diagnostics import model_warnings, shortest_triplet_r3
from learner_service.gp import GaussianProcess, OptimizationResult

HYPS = {"sig2": 0.5, "ls2": 1.0, "sig3": 0.1, "ls3": 1.0, "noise": 0.05}
A_SI = 5.43  # Å, diamond Si: nearest neighbours at a√3/4 = 2.351 Å, second at a/√2 = 3.840 Å


def _si_model(r3, energy=False, r2=5.0):
    si = bulk("Si", "diamond", a=A_SI, cubic=True)
    si.rattle(0.01, seed=1)
    gp = GaussianProcess([14], (r2, r3), HYPS)
    forces = np.random.default_rng(0).normal(0, 0.1, (len(si), 3))
    gp.add_structure(si, forces=forces, atom_indices=[0, 3], energy=-40.0 if energy else None)
    return gp


def test_si_diamond_with_r3_below_the_second_neighbour_distance_has_no_triplets():
    gp = _si_model(3.5, energy=True)
    warnings = model_warnings(gp)
    assert len(warnings) == 1, warnings
    w = warnings[0]
    assert "no triplets within r3 = 3.5 Å" in w and "3-body term does nothing" in w
    # the fix names the second-neighbour distance a/√2 = 3.84 Å (rattled by 0.01 Å)
    need = float(w.split("needs r3 > ")[1].split(" Å")[0])
    assert need == pytest.approx(A_SI / np.sqrt(2), abs=0.05)
    assert shortest_triplet_r3(gp._training_batch()) == pytest.approx(A_SI / np.sqrt(2), abs=0.05)
    # and it is right: with r3 just above that bound triplets appear
    assert int(_si_model(need + 0.01, energy=True)._training_batch().trip_offsets[-1]) > 0


def test_si_diamond_with_r3_4_5_is_clean():
    gp = _si_model(4.5, energy=True)
    assert model_warnings(gp) == []
    assert gp._training_batch().trip_offsets[-1] > 0


def test_r2_below_the_nearest_neighbour_distance_empties_both_terms():
    gp = _si_model(2.0, energy=True, r2=2.2)
    warnings = model_warnings(gp)
    assert any("no pairs within r2 = 2.2 Å" in w for w in warnings)
    assert any("no triplets within r3 = 2 Å" in w and "no environment has two neighbours within r2" in w
               for w in warnings)


def test_forces_only_model_warns_about_energies():
    gp = _si_model(4.5)
    warnings = model_warnings(gp)
    assert len(warnings) == 1 and "defined only up to a constant" in warnings[0]
    assert gp.n_energy_labels == 0 and _si_model(4.5, energy=True).n_energy_labels == 1
    assert model_warnings(GaussianProcess([14], (5.0, 4.5), HYPS)) == []  # no data: nothing to say


def _result(converged=True, at_bounds=None):
    return OptimizationResult(converged=converged, iterations=200, evaluations=230, message="ABNORMAL",
                              log_likelihood=1.0, gradient={}, hyperparameters={}, max_iterations=200, seconds=1.0,
                              at_bounds=at_bounds or {}, bounds={"sig3": (1e-6, 10.0)})


def test_optimisation_not_converged_and_on_a_bound():
    gp = _si_model(4.5, energy=True)
    assert model_warnings(gp, _result()) == []
    w = model_warnings(gp, _result(converged=False, at_bounds={"sig3": "lower"}))
    assert len(w) == 2
    assert "did not converge after 200 iterations" in w[0] and "ABNORMAL" in w[0]
    assert "sig3 at its lower bound 1e-06 eV" in w[1]


def test_fit_prints_warning_lines(tmp_path):
    from ase.io import write

    from learner_service.offline import fit_model

    frames = []
    for seed in range(2):
        si = bulk("Si", "diamond", a=A_SI, cubic=True)
        si.rattle(0.02, seed=seed)
        forces = np.random.default_rng(seed).normal(0, 0.1, (len(si), 3))  # any forces do for the warnings
        si.calc = SinglePointCalculator(si, forces=forces)
        frames.append(si)
    path = tmp_path / "si.xyz"
    write(path, frames, format="extxyz")
    lines = []
    fit_model(path, (5.0, 3.5), atoms=[0], optimize=False, out=tmp_path / "m.npz", log=lines.append)
    warnings = [x for x in lines if x.startswith("WARNING: ")]
    assert any("no triplets within r3 = 3.5 Å" in x for x in warnings)
    assert any("defined only up to a constant" in x for x in warnings)


def test_model_info_carries_the_warnings():
    from learner_service.servicer import model_info
    from protos.epicycle.v1 import learner_pb2

    info = learner_pb2.ModelInfo.FromString(model_info(_si_model(3.5), 3).SerializeToString())
    assert len(info.warnings) == 2
    assert "no triplets within r3 = 3.5 Å" in info.warnings[0] and "up to a constant" in info.warnings[1]
    assert list(model_info(_si_model(4.5, energy=True), 3).warnings) == []
