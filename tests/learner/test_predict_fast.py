"""The fast prediction path (kernels.prediction_blocks, GaussianProcess._predict_fast)
against the general kernel path (kernels.kernel_blocks) and the slow NumPy reference.

Both compute the same sums in a different order, so they agree to round-off: 1e-12
relative to the largest entry of each quantity (variances: relative to the prior
variance, of which they are a small difference).
"""

import numpy as np
import pytest
from ase import Atoms

from learner_service.environment import Cutoffs, EnvironmentBatch, build_environments
from learner_service.gp import GaussianProcess
from learner_service.kernels import LabelGroups, kernel_blocks, prediction_blocks

from . import reference as ref

RTOL = 1e-12
HYPS = {"sig2": 0.3, "ls2": 0.9, "sig3": 0.05, "ls3": 0.7, "noise": 0.05}


def _close(a, b, rtol=RTOL):
    scale = np.abs(b).max()
    assert scale > 0
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)


def _random_cell(seed, species, n=4, cell=None, delta=0.0):
    """A small, skewed periodic cell (smaller than the cutoffs: several images of every atom)."""
    rng = np.random.default_rng(seed)
    if cell is None:
        cell = np.array([[3.6, 0.0, 0.0], [0.5, 3.8, 0.0], [-0.3, 0.4, 3.7]]) * (1 + delta)
    pos = rng.uniform(0, 1, (n, 3)) @ cell
    nums = rng.choice(species, n)
    return Atoms(nums, positions=pos, cell=cell, pbc=True)


def _blocks_both_ways(train, groups, test, cut, ls2=0.8, ls3=0.7, n_species=2):
    m = len(test)
    K2, K3, P2, P3 = prediction_blocks(train, groups, test, n_species, ls2, ls3)
    gb = LabelGroups.per_environment(np.arange(m), energy=True, force=True)
    R2, R3 = kernel_blocks(train, groups, gb, ls2, ls3, batch_b=test)
    sg = LabelGroups.per_environment(np.arange(m))
    s2, s3 = kernel_blocks(test, sg, None, ls2, ls3, diagonal=True)
    return (K2.reshape(R2.shape), R2), (K3.reshape(R3.shape), R3), (np.diagonal(P2, axis1=1, axis2=2).ravel(), np.diag(s2)), \
        (np.diagonal(P3, axis1=1, axis2=2).ravel(), np.diag(s3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prediction_blocks_equal_kernel_blocks_multispecies(seed):
    """Force, energy and stress training labels (structure groups with -1/V scales) against
    E and F of every atom of a random three-species periodic cell."""
    cut = Cutoffs.create([13, 29, 8], (4.2, 3.4))
    species = [13, 29, 8]
    train_parts, groups, row = [], [], 0
    base = 0
    for k in range(2):
        at = _random_cell(10 * seed + k, species, n=4, delta=0.05 * k)
        envs = build_environments(at.positions, at.numbers, at.cell.array, at.pbc, cut)
        train_parts.append(envs)
        n = len(envs)
        # force labels of atoms 0 and 2
        forces = LabelGroups.per_environment(base + np.array([0, 2]), row_offset=row)
        row += 6
        # energy + stress of the whole structure
        rows = -np.ones((1, 10), np.int64)
        rows[0, 0] = row
        rows[0, 4:10] = row + 1 + np.arange(6)
        row += 7
        scale = np.ones((1, 10))
        scale[0, 4:10] = -1.0 / at.get_volume()
        groups += [forces, LabelGroups([0, n], base + np.arange(n), rows, scale)]
        base += n
    train = EnvironmentBatch.concatenate(train_parts)
    groups = LabelGroups.concatenate(groups)
    test_at = _random_cell(100 + seed, species, n=5)
    test = build_environments(test_at.positions, test_at.numbers, test_at.cell.array, test_at.pbc, cut)
    assert test.n_triplets.min() > 0
    for fast, general in _blocks_both_ways(train, groups, test, cut, n_species=3):
        _close(fast, general)


def test_prediction_blocks_single_species_and_empty_environments():
    """One species everywhere (all six permutations, the 'mono' branch), a model that knows
    two species, and test atoms without any 3-body (or any) neighbours."""
    cut = Cutoffs.create([13, 29], (4.0, 3.0))
    at = _random_cell(7, [13], n=4)
    train = build_environments(at.positions, at.numbers, at.cell.array, at.pbc, cut)
    groups = LabelGroups.per_environment(np.arange(len(train)))
    # a molecule: an isolated atom (no neighbours), a pair (bonds, no triplets), a triangle
    pos = np.array([[0, 0, 0], [10, 0, 0], [12.2, 0, 0], [20, 0, 0], [22.4, 0, 0], [21.1, 2.0, 0]], float)
    test = build_environments(pos, [13] * 6, np.zeros((3, 3)), [False] * 3, cut)
    assert test.n_bonds[0] == 0 and test.n_triplets[1] == 0 and test.n_triplets[3] > 0
    for fast, general in _blocks_both_ways(train, groups, test, cut):
        _close(fast, general)


def test_prior_and_cross_blocks_match_numpy_reference():
    """Small skewed periodic cell with many images: k_FF(x, x) diagonal and the cross block
    k_FF(x, x') against the brute-force NumPy kernels."""
    r2, r3 = 5.0, 3.6
    cut = Cutoffs.create([13, 29], (r2, r3))
    at = _random_cell(3, [13, 29], n=3)
    bt = _random_cell(4, [13, 29], n=3, delta=0.03)
    at.numbers = [13, 29, 13]
    bt.numbers = [29, 13, 13]
    cell_a, cell_b = at.cell.array, bt.cell.array
    ea = build_environments(at.positions, at.numbers, cell_a, at.pbc, cut, [0])
    eb = build_environments(bt.positions, bt.numbers, cell_b, bt.pbc, cut, [1])
    ls = 0.8
    K2, K3, P2, P3 = prediction_blocks(ea, LabelGroups.per_environment([0]), eb, 2, ls, ls)
    ra = ref.brute_environment(at.positions, at.numbers, cell_a, 0, r2, r3)
    rb = ref.brute_environment(bt.positions, bt.numbers, cell_b, 1, r2, r3)
    assert len(rb["triplets"]) > 3 and np.abs(ref.threebody_ff(ra, rb, 1.0, ls, r3)).max() > 0
    # periodic images of the centre itself are among its neighbours
    assert any(j == 1 for _, _, j in ref.brute_neighbours(bt.positions, cell_b, 1, r2))
    _close(K2[:, 0, 1:4], ref.twobody_ff(ra, rb, 1.0, ls, r2))
    _close(K3[:, 0, 1:4], ref.threebody_ff(ra, rb, 1.0, ls, r3))
    # the full prior 3×3 self-block, off-diagonal entries included
    _close(P2[0], ref.twobody_ff(rb, rb, 1.0, ls, r2))
    _close(P3[0], ref.threebody_ff(rb, rb, 1.0, ls, r3))


def test_threads_give_identical_results():
    cut = Cutoffs.create([13, 29], (4.2, 3.4))
    at = _random_cell(11, [13, 29], n=4)
    train = build_environments(at.positions, at.numbers, at.cell.array, at.pbc, cut)
    groups = LabelGroups.per_environment(np.arange(len(train)), energy=True)
    test_at = _random_cell(12, [13, 29], n=7)
    test = build_environments(test_at.positions, test_at.numbers, test_at.cell.array, test_at.pbc, cut)
    one = prediction_blocks(train, groups, test, 2, 0.8, 0.7, threads=1)
    two = prediction_blocks(train, groups, test, 2, 0.8, 0.7, threads=3)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def alcu_gp():
    from ase.calculators.emt import EMT

    gp = GaussianProcess([13, 29], (4.5, 3.5), HYPS, energy_noise=0.02, stress_noise=0.002)
    for s in range(2):
        at = _random_cell(20 + s, [13, 29], n=6, cell=np.diag([4.0, 4.1, 3.9]))
        at.calc = EMT()
        gp.add_structure(at, forces=at.get_forces(), atom_indices=[0, 3], energy=at.get_potential_energy(),
                         stress=at.get_stress())
        gp.add_structure(at, forces=at.get_forces(), atom_indices=[1, 5])
    gp.train()
    return gp


def test_gp_fast_prediction_equals_general_path(alcu_gp):
    gp = alcu_gp
    at = _random_cell(30, [13, 29], n=6, cell=np.diag([4.0, 4.1, 3.9]))
    envs = build_environments(at.positions, at.numbers, at.cell.array, at.pbc, gp.cutoffs)
    st = gp._factorize()
    mean_f, var_f = gp._predict_fast(envs, st)
    mean_g, var_g = gp._predict_general(envs, st, False)
    _close(mean_f[:, 1:4], mean_g[:, 1:4])
    _close(mean_f[:, 0], mean_g[:, 0])
    prior = gp._predict_fast(envs, None)[1]
    np.testing.assert_allclose(var_f, var_g, rtol=0, atol=RTOL * np.abs(prior).max())
    diag_f, diag_p = np.diagonal(var_f, axis1=1, axis2=2), np.diagonal(prior, axis1=1, axis2=2)
    assert (diag_f > 0).all() and (diag_f < diag_p).all()
    # public API: predict() (fast) against the stress path (general) for E, F, σ
    p = gp.predict(at)
    q = gp.predict(at, stress=True)
    _close(p.forces, q.forces)
    _close(p.local_energies, q.local_energies)
    np.testing.assert_allclose(p.force_var, q.force_var, rtol=0, atol=RTOL * np.abs(prior).max())
    assert p.energy == pytest.approx(q.energy, rel=1e-12)


def test_gp_fast_prediction_subset_and_untrained_model(alcu_gp):
    at = _random_cell(31, [13, 29], n=6, cell=np.diag([4.0, 4.1, 3.9]))
    full = alcu_gp.predict(at)
    part = alcu_gp.predict(at, atom_indices=[4, 1])
    np.testing.assert_allclose(part.forces[[1, 4]], full.forces[[1, 4]], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(part.force_var[[1, 4]], full.force_var[[1, 4]], rtol=1e-10, atol=1e-16)
    assert np.all(part.forces[[0, 2, 3, 5]] == 0)
    empty = GaussianProcess([13, 29], (4.5, 3.5), HYPS)
    p = empty.predict(at)
    envs = build_environments(at.positions, at.numbers, at.cell.array, at.pbc, empty.cutoffs)
    _close(p.force_var, np.diagonal(empty._predict_general(envs, None, False)[1], axis1=1, axis2=2))
    assert np.all(p.forces == 0)
