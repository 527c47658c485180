"""The rotation-invariant per-atom σ (issue 13, item 1): ``Prediction.force_cov`` (n, 3, 3) and
``Prediction.atom_std`` (n,) = sqrt(λ_max(force_cov)).

A component σ is the square root of a diagonal entry of the atom's 3×3 posterior force
covariance C; rotating the structure by R turns C into R C R^T, which moves the diagonal but
not the eigenvalues.  These tests check that maths against an independent route: the full
3m × 3m posterior covariance K** - K*^T K_y^-1 K* built from :func:`kernel_blocks` and solved
with ``np.linalg.solve`` (no Cholesky, no per-atom blocks).
"""

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.emt import EMT
from scipy.spatial.transform import Rotation

from learner_service.environment import build_environments
from learner_service.gp import GaussianProcess, atom_std_of
from learner_service.kernels import LabelGroups, kernel_blocks, prediction_blocks

HYPS = {"sig2": 0.3, "ls2": 0.9, "sig3": 0.05, "ls3": 0.7, "noise": 0.05}


def _cell(seed, n=6, cell=np.diag([4.0, 4.1, 3.9])):
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0, 1, (n, 3)) @ cell
    return Atoms(rng.choice([13, 29], n), positions=pos, cell=cell, pbc=True)


def _rotated(atoms, R):
    out = atoms.copy()
    out.set_cell(atoms.cell.array @ R.T, scale_atoms=False)
    out.positions = atoms.positions @ R.T
    return out


@pytest.fixture(scope="module")
def gp():
    model = GaussianProcess([13, 29], (4.5, 3.5), HYPS, energy_noise=0.02)
    for s in range(2):
        at = _cell(40 + s)
        at.calc = EMT()
        model.add_structure(at, forces=at.get_forces(), atom_indices=[0, 3], energy=at.get_potential_energy())
        model.add_structure(at, forces=at.get_forces(), atom_indices=[1, 5])
    model.train()
    return model


def _slow_posterior(gp, atoms):
    """(3m, 3m) epistemic posterior covariance of all force components of ``atoms``, eV²/Å²."""
    h = gp.hyperparameters
    envs = build_environments(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc, gp.cutoffs)
    m = len(envs)
    test = LabelGroups.per_environment(np.arange(m), energy=False, force=True)
    k2, k3 = kernel_blocks(gp._training_batch(), gp._label_groups(gp._groups), test, h["ls2"], h["ls3"], batch_b=envs)
    t2, t3 = kernel_blocks(envs, test, None, h["ls2"], h["ls3"])
    Ks = h["sig2"] ** 2 * k2 + h["sig3"] ** 2 * k3
    Kss = h["sig2"] ** 2 * t2 + h["sig3"] ** 2 * t3
    return Kss - Ks.T @ np.linalg.solve(gp.covariance_matrix(), Ks)


def test_atom_std_is_the_largest_eigenvalue_of_the_full_posterior_blocks(gp):
    atoms = _cell(7)
    p = gp.predict(atoms)
    S = _slow_posterior(gp, atoms)
    n = len(atoms)
    blocks = np.array([S[3 * i:3 * i + 3, 3 * i:3 * i + 3] for i in range(n)])
    scale = np.abs(blocks).max()
    np.testing.assert_allclose(p.force_cov, blocks, rtol=0, atol=1e-9 * scale)
    expected = np.sqrt(np.linalg.eigvalsh(blocks)[:, -1])
    np.testing.assert_allclose(p.atom_std, expected, rtol=1e-7)
    # the same through the general (stress) path
    q = gp.predict(atoms, stress=True)
    np.testing.assert_allclose(q.force_cov, blocks, rtol=0, atol=1e-9 * scale)
    np.testing.assert_allclose(q.atom_std, expected, rtol=1e-7)
    # off-diagonal entries are not negligible here (else the test could not tell the two σ apart)
    off = np.abs(blocks[:, [0, 0, 1], [1, 2, 2]]).max()
    assert off > 0.05 * np.abs(np.diagonal(blocks, axis1=1, axis2=2)).max()


def test_atom_std_is_rotation_invariant_component_sigma_is_not(gp):
    atoms = _cell(8)
    p = gp.predict(atoms)
    for seed in range(3):
        R = Rotation.random(random_state=seed).as_matrix()
        q = gp.predict(_rotated(atoms, R))
        np.testing.assert_allclose(q.atom_std, p.atom_std, rtol=1e-9)
        np.testing.assert_allclose(q.forces, p.forces @ R.T, rtol=0, atol=1e-9 * np.abs(p.forces).max())
        # the covariance rotates as a tensor: C' = R C R^T
        np.testing.assert_allclose(q.force_cov, R @ p.force_cov @ R.T, rtol=0,
                                   atol=1e-9 * np.abs(p.force_cov).max())
        change = np.abs(q.force_std - p.force_std).max() / p.force_std.max()
        assert change > 0.01, f"rotation {seed} left the component σ unchanged ({change:.2e})"


def test_atom_std_bounds_and_permutation(gp):
    atoms = _cell(9)
    p = gp.predict(atoms)
    trace = np.trace(p.force_cov, axis1=1, axis2=2)
    assert np.all(p.atom_std >= p.force_std.max(axis=1) * (1 - 1e-12))
    assert np.all(p.atom_std <= np.sqrt(trace) * (1 + 1e-12))
    np.testing.assert_allclose(p.force_cov, np.swapaxes(p.force_cov, 1, 2), rtol=0,
                               atol=1e-14 * np.abs(p.force_cov).max())
    np.testing.assert_array_equal(p.force_var, np.diagonal(p.force_cov, axis1=1, axis2=2))
    perm = np.random.default_rng(1).permutation(len(atoms))
    q = gp.predict(atoms[perm])
    np.testing.assert_allclose(q.atom_std, p.atom_std[perm], rtol=1e-9)
    # a subset: the other rows are zero, the chosen ones those of the full prediction
    part = gp.predict(atoms, atom_indices=[2, 4])
    np.testing.assert_allclose(part.atom_std[[2, 4]], p.atom_std[[2, 4]], rtol=1e-9)
    assert np.all(part.atom_std[[0, 1, 3, 5]] == 0)


def test_prior_block_is_symmetric_psd_with_the_old_diagonal():
    atoms = _cell(10, n=5)
    from learner_service.environment import Cutoffs, EnvironmentBatch

    cut = Cutoffs.create([13, 29], (4.5, 3.5))
    envs = build_environments(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc, cut)
    _, _, P2, P3 = prediction_blocks(EnvironmentBatch.empty(), LabelGroups.concatenate([]), envs, 2, 0.9, 0.7)
    sg = LabelGroups.per_environment(np.arange(len(envs)))
    d2, d3 = kernel_blocks(envs, sg, None, 0.9, 0.7, diagonal=True)
    for P, d in ((P2, d2), (P3, d3)):
        np.testing.assert_allclose(P, np.swapaxes(P, 1, 2), rtol=0, atol=1e-13 * np.abs(P).max())
        assert np.linalg.eigvalsh(P).min() > -1e-12 * np.abs(P).max()
        np.testing.assert_allclose(np.trace(P, axis1=1, axis2=2), np.diag(d).reshape(-1, 3).sum(axis=1), rtol=1e-12)
        assert np.abs(P[:, 0, 1]).max() > 0  # a full block, not a diagonal one


def test_untrained_model_atom_std_is_the_prior():
    model = GaussianProcess([13, 29], (4.5, 3.5), HYPS)
    atoms = _cell(11)
    p = model.predict(atoms)
    S = _slow_posterior_prior(model, atoms)
    expected = np.sqrt(np.linalg.eigvalsh(S)[:, -1])
    np.testing.assert_allclose(p.atom_std, expected, rtol=1e-10)


def _slow_posterior_prior(model, atoms):
    h = model.hyperparameters
    envs = build_environments(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc, model.cutoffs)
    m = len(envs)
    t2, t3 = kernel_blocks(envs, LabelGroups.per_environment(np.arange(m)), None, h["ls2"], h["ls3"])
    K = h["sig2"] ** 2 * t2 + h["sig3"] ** 2 * t3
    return np.array([K[3 * i:3 * i + 3, 3 * i:3 * i + 3] for i in range(m)])


def test_conditioned_atom_std_equals_adding_the_data(gp):
    atoms = _cell(12)
    queued = [(_cell(13), [0, 2]), (atoms, [4])]
    cond = gp.predict(atoms, condition_on=queued)
    explicit = gp.clone()
    for a, idx in queued:
        explicit.add_structure(a, forces=np.zeros((len(a), 3)), atom_indices=idx)
    explicit.train()
    ref = explicit.predict(atoms)
    scale = np.abs(ref.force_cov).max()
    np.testing.assert_allclose(cond.force_cov, ref.force_cov, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(cond.atom_std, ref.atom_std, rtol=1e-8)
    assert cond.atom_std[4] < 0.5 * gp.predict(atoms).atom_std[4]


def test_atom_std_of_clips_round_off():
    cov = np.zeros((2, 3, 3))
    cov[0] = np.diag([-1e-18, -2e-18, -3e-18])
    cov[1] = [[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]]  # eigenvalues 1, 1, 3
    np.testing.assert_allclose(atom_std_of(cov), [0.0, np.sqrt(3.0)], rtol=1e-14)
    assert atom_std_of(np.zeros((0, 3, 3))).shape == (0,)
