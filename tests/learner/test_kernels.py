"""Kernels against a slow NumPy reference and against finite differences."""

import numpy as np
import pytest
from ase import Atoms

from learner_service.environment import Cutoffs, EnvironmentBatch, build_environments
from learner_service.kernels import W2, W3, LabelGroups, exp_neg, kernel_blocks

from . import reference as ref

R2, R3 = 5.0, 3.6
CUT = Cutoffs.create([13, 29], (R2, R3))


def _cluster(seed, n=8, box=4.2):
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0, box, (n, 3))
    pos[0] = box / 2
    nums = np.where(rng.random(n) < 0.5, 13, 29)
    nums[0] = 13
    return pos, nums


def _env(pos, nums, cell=None, pbc=False):
    cell = np.zeros((3, 3)) if cell is None else cell
    return build_environments(pos, nums, cell, [pbc] * 3, CUT, [0])


def _pair_blocks(pa, na, pb, nb, ls=0.8, body=2, grad=False, cell=None, pbc=False):
    batch = EnvironmentBatch.concatenate([_env(pa, na, cell, pbc), _env(pb, nb, cell, pbc)])
    ga = LabelGroups.per_environment([0], energy=True, force=True, stress=True)
    gb = LabelGroups.per_environment([1], energy=True, force=True, stress=True)
    out = kernel_blocks(batch, ga, gb, ls, ls, grad=grad, use2=body == 2, use3=body == 3)
    if grad:
        return (out[0], out[2]) if body == 2 else (out[1], out[3])
    return out[0] if body == 2 else out[1]


def test_vectorised_exp_matches_numpy():
    x = -np.concatenate([np.linspace(0, 50, 2001), [0.0, 1e-300, 699.9]])
    ours = np.array([exp_neg(v) for v in x])
    np.testing.assert_allclose(ours, np.exp(x), rtol=1e-13, atol=0)
    assert exp_neg(-800.0) == 0.0


@pytest.mark.parametrize("seed", [1, 2])
def test_force_force_kernels_match_numpy_reference(seed):
    pa, na = _cluster(seed)
    pb, nb = _cluster(seed + 10)
    nb = na.copy()  # same composition so 3-body clusters match
    ea = ref.brute_environment(pa, na, np.zeros((3, 3)), 0, R2, R3, n_img=0)
    eb = ref.brute_environment(pb, nb, np.zeros((3, 3)), 0, R2, R3, n_img=0)
    assert ea["triplets"] and eb["triplets"]
    K2 = _pair_blocks(pa, na, pb, nb, ls=0.8, body=2)[1:4, 1:4]
    K3 = _pair_blocks(pa, na, pb, nb, ls=0.8, body=3)[1:4, 1:4]
    np.testing.assert_allclose(K2, ref.twobody_ff(ea, eb, 1.0, 0.8, R2), rtol=1e-10, atol=1e-10 * np.abs(K2).max())
    np.testing.assert_allclose(K3, ref.threebody_ff(ea, eb, 1.0, 0.8, R3), rtol=1e-10, atol=1e-10 * np.abs(K3).max())
    assert np.abs(K3).max() > 0


def test_periodic_environment_kernel_matches_reference():
    rng = np.random.default_rng(5)
    cell = np.array([[3.9, 0.0, 0.0], [0.4, 4.1, 0.0], [0.2, -0.3, 3.8]])
    pos = rng.uniform(0, 1, (3, 3)) @ cell
    nums = np.array([13, 29, 13])
    env = build_environments(pos, nums, cell, [True] * 3, CUT, [0])
    batch = env
    g = LabelGroups.per_environment([0])
    K2, K3 = kernel_blocks(batch, g, None, 0.7, 0.9)
    e = ref.brute_environment(pos, nums, cell, 0, R2, R3)
    np.testing.assert_allclose(K2, ref.twobody_ff(e, e, 1.0, 0.7, R2), rtol=1e-10)
    np.testing.assert_allclose(K3, ref.threebody_ff(e, e, 1.0, 0.9, R3), rtol=1e-10)


@pytest.mark.parametrize("body,weight", [(2, W2), (3, W3)])
def test_force_kernels_are_derivatives_of_the_energy_kernel(body, weight):
    """k_FE = -(1/w) dk_EE/dx_A and k_FF = -(1/w) d k_FE / dx_B (Eq. 3), by central differences."""
    pa, na = _cluster(3)
    pb, nb = _cluster(4)
    nb = na.copy()
    K = _pair_blocks(pa, na, pb, nb, body=body)
    h = 1e-5
    fe = np.zeros(3)
    ff = np.zeros((3, 3))
    for a in range(3):
        dp = np.zeros_like(pa)
        dp[0, a] = h
        fe[a] = -(_pair_blocks(pa + dp, na, pb, nb, body=body)[0, 0]
                  - _pair_blocks(pa - dp, na, pb, nb, body=body)[0, 0]) / (2 * h) / weight
        ff[:, a] = -(_pair_blocks(pa, na, pb + dp, nb, body=body)[1:4, 0]
                     - _pair_blocks(pa, na, pb - dp, nb, body=body)[1:4, 0]) / (2 * h) / weight
    scale = np.abs(K[1:4, 1:4]).max()
    assert scale > 0
    np.testing.assert_allclose(K[1:4, 0], fe, atol=1e-6 * np.abs(fe).max())
    np.testing.assert_allclose(K[1:4, 1:4], ff, atol=1e-6 * scale)
    # mirror blocks
    Kt = _pair_blocks(pb, nb, pa, na, body=body)
    np.testing.assert_allclose(Kt, K.T, atol=1e-12 * np.abs(K).max())


@pytest.mark.parametrize("body", [2, 3])
def test_length_scale_derivatives(body):
    pa, na = _cluster(6)
    pb, nb = _cluster(7)
    nb = na.copy()
    _, dK = _pair_blocks(pa, na, pb, nb, ls=0.9, body=body, grad=True)
    h = 1e-6
    num = (_pair_blocks(pa, na, pb, nb, ls=0.9 + h, body=body)
           - _pair_blocks(pa, na, pb, nb, ls=0.9 - h, body=body)) / (2 * h)
    np.testing.assert_allclose(dK, num, atol=1e-6 * np.abs(num).max())


def _strained(atoms, eps):
    a = atoms.copy()
    F = np.eye(3) + eps
    a.set_cell(atoms.cell.array @ F.T, scale_atoms=False)
    a.positions = atoms.positions @ F.T
    return a


@pytest.mark.parametrize("body", [2, 3])
def test_stress_kernels_are_strain_derivatives(body):
    """Structure stress functional = (1/V) dE/dε (ASE sign), for the energy–stress and
    stress–stress covariances of two small periodic structures."""
    rng = np.random.default_rng(8)
    cell = np.diag([4.0, 4.2, 3.9])
    A = Atoms([13, 13, 29], positions=rng.uniform(0, 1, (3, 3)) @ cell, cell=cell, pbc=True)
    B = Atoms([13, 29, 13], positions=rng.uniform(0, 1, (3, 3)) @ cell, cell=cell * 1.02, pbc=True)

    def structure_group(at):
        batch = build_environments(at.positions, at.numbers, at.cell.array, at.pbc, CUT)
        rows = -np.ones((1, 10), np.int64)
        rows[0, 0] = 0
        rows[0, 4:10] = 1 + np.arange(6)
        scale = np.ones((1, 10))
        scale[0, 4:10] = -1.0 / at.get_volume()
        return batch, LabelGroups([0, len(batch)], np.arange(len(batch)), rows, scale)

    def kee(a, b):
        ba, ga = structure_group(a)
        bb, gb = structure_group(b)
        K2, K3 = kernel_blocks(ba, ga, gb, 0.8, 0.8, batch_b=bb, use2=body == 2, use3=body == 3)
        return K2 if body == 2 else K3

    K = kee(A, B)
    voigt = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
    h = 1e-5

    def strain(i, step):
        e = np.zeros((3, 3))
        p, q = voigt[i]
        if p == q:
            e[p, p] = step
        else:
            e[p, q] = e[q, p] = step / 2
        return e

    se = np.zeros(6)
    ss = np.zeros((6, 6))
    for i in range(6):
        se[i] = (kee(_strained(A, strain(i, h)), B)[0, 0] - kee(_strained(A, strain(i, -h)), B)[0, 0]) / (2 * h)
        se[i] /= A.get_volume()
        for j in range(6):
            vals = []
            for si, sj in ((h, h), (h, -h), (-h, h), (-h, -h)):
                vals.append(kee(_strained(A, strain(i, si)), _strained(B, strain(j, sj)))[0, 0])
            ss[i, j] = (vals[0] - vals[1] - vals[2] + vals[3]) / (4 * h * h) / (A.get_volume() * B.get_volume())
    np.testing.assert_allclose(K[1:7, 0], se, atol=1e-5 * np.abs(se).max())
    np.testing.assert_allclose(K[1:7, 1:7], ss, atol=1e-4 * np.abs(ss).max())
