"""The uncertainty threshold acts on the rotation-invariant per-atom σ (issue 13, item 1).

A GP force provider gives ``atom_std`` (sqrt of the largest eigenvalue of each atom's 3×3
epistemic force covariance); the engine stops when any atom's ``atom_std`` exceeds the
threshold.  A rigidly rotated copy of the same run (positions, cell and velocities rotated)
is the same physical trajectory, so it must stop at the same step on the same atoms.
"""

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from scipy.spatial.transform import Rotation

from learner_service.gp import GaussianProcess
from sampler_service.builtin_engine import BuiltinEngine
from sampler_service.engine_interface import uncertainty_crossing
from sampler_service.force_providers import ForceResult
from sampler_service.settings import SamplerSettings

HYPS = {"sig2": 0.3, "ls2": 0.9, "sig3": 0.05, "ls3": 0.7, "noise": 0.02}


class GPProvider:
    def __init__(self, gp, invariant=True):
        self.gp, self.invariant = gp, invariant

    def compute(self, positions, cell, numbers, pbc):
        from ase import Atoms

        p = self.gp.predict(Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc))
        return ForceResult(energy=p.energy, forces=p.forces, force_std=p.force_std, noise=p.noise,
                           model_version=p.model_version, atom_std=p.atom_std if self.invariant else None)


@pytest.fixture(scope="module")
def gp():
    model = GaussianProcess([29], (4.5, 3.5), HYPS)
    for seed in range(2):
        at = bulk("Cu", cubic=True).repeat(2)
        at.rattle(0.05, seed=seed)
        at.calc = EMT()
        model.add_structure(at, forces=at.get_forces(), atom_indices=[0, 9, 18, 27])
    return model.train()


def _start(R):
    at = bulk("Cu", cubic=True).repeat(2)
    at.rattle(0.03, seed=7)
    v = np.random.default_rng(4).normal(0.0, 0.01, (len(at), 3))  # Å/fs
    v -= v.mean(axis=0)
    out = at.copy()
    out.set_cell(at.cell.array @ R.T, scale_atoms=False)
    out.positions = at.positions @ R.T
    return out, v @ R.T


def _run(gp, R, threshold, steps=60, invariant=True):
    atoms, v = _start(R)
    eng = BuiltinEngine(SamplerSettings(timestep_fs=2.0), GPProvider(gp, invariant), atoms)
    eng.set_velocities(v)
    return eng.run(steps, threshold=threshold)


def test_rotated_copy_stops_at_the_same_step_on_the_same_atoms(gp):
    # a threshold the run crosses after some steps: between the σ at the start and at step 40
    free = _run(gp, np.eye(3), None, steps=40)
    assert free.reason == "max_steps"
    start = GPProvider(gp).compute(*[getattr(_start(np.eye(3))[0], f)() for f in
                                     ("get_positions", "get_cell", "get_atomic_numbers", "get_pbc")])
    end = free.frame.atom_std.max()
    assert end > 1.2 * start.atom_std.max(), "the trajectory must leave the training data for this test"
    threshold = 0.5 * (start.atom_std.max() + end)
    ref = _run(gp, np.eye(3), threshold)
    assert ref.reason == "uncertain" and 1 <= ref.step < 40
    assert np.all(ref.uncertain_components[:, 1] == -1)
    assert ref.max_std == pytest.approx(ref.frame.atom_std.max(), rel=1e-14) and ref.max_std > threshold
    np.testing.assert_array_equal(ref.uncertain_atoms, np.flatnonzero(ref.frame.atom_std > threshold))
    for seed in range(3):
        R = Rotation.random(random_state=10 + seed).as_matrix()
        got = _run(gp, R, threshold)
        assert got.reason == "uncertain" and got.step == ref.step, f"rotation {seed}"
        np.testing.assert_array_equal(got.uncertain_atoms, ref.uncertain_atoms)
        np.testing.assert_allclose(got.uncertain_std, ref.uncertain_std, rtol=1e-8)
        np.testing.assert_allclose(got.frame.positions, _wrap(ref.frame.positions @ R.T, got.frame.cell),
                                   rtol=0, atol=1e-7)


def _wrap(pos, cell):
    frac = np.linalg.solve(cell.T, pos.T).T
    return (frac - np.floor(frac + 1e-12)) @ cell


def test_component_sigma_is_the_fallback_and_bounded_by_atom_sigma():
    comp = np.array([[0.1, 0.3, 0.2], [0.05, 0.01, 0.02]])
    only_comp = ForceResult(energy=0.0, forces=np.zeros((2, 3)), force_std=comp)
    comps, sig = uncertainty_crossing(only_comp, 0.15)
    np.testing.assert_array_equal(comps, [[0, 1], [0, 2]])
    np.testing.assert_array_equal(sig, [0.3, 0.2])
    assert only_comp.max_std == 0.3
    both = ForceResult(energy=0.0, forces=np.zeros((2, 3)), force_std=comp, atom_std=np.array([0.35, 0.16]))
    comps, sig = uncertainty_crossing(both, 0.15)
    np.testing.assert_array_equal(comps, [[0, -1], [1, -1]])
    np.testing.assert_array_equal(sig, [0.35, 0.16])
    assert both.max_std == 0.35
    assert uncertainty_crossing(both, 0.4) is None and uncertainty_crossing(both, None) is None
    with pytest.raises(Exception, match="atom_std"):
        ForceResult(energy=0.0, forces=np.zeros((2, 3)), atom_std=np.array([0.1, -0.1])).checked(2)
