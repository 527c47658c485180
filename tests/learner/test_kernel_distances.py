"""GaussianProcess.kernel_distances: the local-energy kernel metric that acquisition uses (issue 14).

d(x, y)² = k(x, x) + k(y, y) − 2 k(x, y), k = sig2² k2 + sig3² k3 of the local energies (eV²).
Checked against a pure-NumPy evaluation written from the kernel's formula, and for the axioms
of a (pseudo-)metric and the symmetries of the physics.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from scipy.spatial.transform import Rotation

from learner_service.gp import GaussianProcess
from protos.errors import InvalidInput
from tests.learner.reference import brute_environment

HYPS = {"sig2": 1.0, "ls2": 1.0, "sig3": 0.05, "ls3": 1.0, "noise": 0.05}
R2, R3 = 5.0, 3.5


def al32(seed: int, amplitude: float) -> "object":
    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))
    atoms.positions += np.random.default_rng(seed).uniform(-amplitude, amplitude, atoms.positions.shape)
    return atoms


def local_energy_kernel(e1: dict, e2: dict, h: dict) -> float:
    """cov(E_x, E_y), eV², by brute force: E_i = 1/2 Σ pairs + 1/3 Σ triplets (FLARE), so the
    2-body sum carries (1/2)², the 3-body sum (1/3)²; cutoff functions (r_c − r)² per bond."""
    k2 = 0.0
    for ra, _, za in e1["bonds"]:
        for rb, _, zb in e2["bonds"]:
            c1, c2 = e1["center"], e2["center"]
            if (c1 == c2 and za == zb) or (c1 == zb and c2 == za):
                k2 += math.exp(-(ra - rb) ** 2 / (2 * h["ls2"] ** 2)) * (R2 - ra) ** 2 * (R2 - rb) ** 2
    k3 = 0.0
    bonds = [(0, 1), (0, 2), (1, 2)]
    for t1 in e1["triplets"]:
        a = np.array(t1[:3])
        s1 = (e1["center"], t1[5], t1[6])
        for t2 in e2["triplets"]:
            b = np.array(t2[:3])
            s2 = (e2["center"], t2[5], t2[6])
            fc = np.prod((R3 - a) ** 2) * np.prod((R3 - b) ** 2)
            for perm in itertools.permutations(range(3)):
                if any(s1[i] != s2[perm[i]] for i in range(3)):
                    continue
                pi = [bonds.index(tuple(sorted((perm[p], perm[q])))) for p, q in bonds]
                k3 += math.exp(-float(((a - b[pi]) ** 2).sum()) / (2 * h["ls3"] ** 2)) * fc
    return h["sig2"] ** 2 * k2 / 4 + h["sig3"] ** 2 * k3 / 9


@pytest.fixture(scope="module")
def model():
    train = al32(1, 0.1)
    train.calc = EMT()
    gp = GaussianProcess([13], (R2, R3), HYPS)
    gp.add_structure(train, forces=train.get_forces(), atom_indices=[0, 1, 9])
    gp.train()
    return gp, train


def test_distances_match_a_brute_force_evaluation_of_the_kernel(model) -> None:
    gp, train = model
    frame = al32(3, 0.25)
    picked = [0, 4, 7, 30]
    d_train, d_within = gp.kernel_distances(frame, picked)
    envs = [brute_environment(frame.positions, frame.numbers, frame.cell.array, i, R2, R3) for i in picked]
    known = [brute_environment(train.positions, train.numbers, train.cell.array, i, R2, R3) for i in (0, 1, 9)]

    def d(x, y):
        return math.sqrt(max(local_energy_kernel(x, x, HYPS) + local_energy_kernel(y, y, HYPS)
                             - 2 * local_energy_kernel(x, y, HYPS), 0.0))

    ref_within = np.array([[d(x, y) for y in envs] for x in envs])
    ref_train = np.array([min(d(x, y) for y in known) for x in envs])
    assert d_within.shape == (4, 4) and d_train.shape == (4,)
    np.testing.assert_allclose(d_within, ref_within, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(d_train, ref_train, rtol=1e-9, atol=1e-9)
    assert ref_within.max() > 0.1  # not a test of zeros


def test_metric_axioms(model) -> None:
    gp, train = model
    frame = al32(5, 0.3)
    d_train, D = gp.kernel_distances(frame)
    n = len(frame)
    assert D.shape == (n, n) and (D >= 0).all() and np.isfinite(D).all()
    np.testing.assert_array_equal(np.diag(D), 0.0)
    np.testing.assert_allclose(D, D.T, rtol=0, atol=1e-12 * D.max())
    # triangle inequality on every triple of the 32 atoms (tolerance: round-off of sqrt of differences)
    slack = D[:, None, :] + D[None, :, :] - D[:, :, None]   # d_ik + d_kj - d_ij at [i, k, j]
    assert slack.min() > -1e-7 * D.max()
    # d(x, x) = 0 against the training set: the training atoms themselves
    d_self, _ = gp.kernel_distances(train, [0, 1, 9])
    assert d_self.max() < 1e-6
    assert d_train.min() > 1e-3


def test_invariant_under_rotation_and_translation(model) -> None:
    gp, _ = model
    frame = al32(8, 0.2)
    d_train, d_within = gp.kernel_distances(frame, [2, 3, 17])
    moved = frame.copy()
    rot = Rotation.from_rotvec([0.3, -1.1, 0.7]).as_matrix()
    moved.positions = frame.positions @ rot.T + np.array([1.3, -0.4, 2.2])
    moved.cell = frame.cell.array @ rot.T
    t2, w2 = gp.kernel_distances(moved, [2, 3, 17])
    np.testing.assert_allclose(t2, d_train, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(w2, d_within, rtol=1e-8, atol=1e-10)


def test_symmetry_equivalent_atoms_are_at_distance_zero(model) -> None:
    """Two nearest neighbours pushed towards each other keep the inversion centre between them."""
    gp, _ = model
    frame = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))
    i, j = 0, 1
    v = frame.positions[j] - frame.positions[i]
    frame.positions[i] += 0.15 * v
    frame.positions[j] -= 0.15 * v
    d_train, D = gp.kernel_distances(frame, [i, j, 2])
    assert D[0, 1] < 1e-6 * D.max()
    assert abs(d_train[0] - d_train[1]) < 1e-9
    assert D[0, 2] > 0.1


def test_no_training_data_gives_infinite_distance_and_bad_indices_are_refused() -> None:
    gp = GaussianProcess([13], (R2, R3), HYPS)
    d_train, D = gp.kernel_distances(al32(2, 0.1), [0, 1])
    assert np.isinf(d_train).all() and D.shape == (2, 2)
    with pytest.raises(InvalidInput, match="out of range"):
        gp.kernel_distances(al32(2, 0.1), [0, 32])
