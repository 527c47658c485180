"""The force-label training covariance (kernels.force_kernel_blocks, used by the GP when every
label is a force component) against the general kernel path and finite differences.

Both paths compute the same sums in a different order (the fast one multiplies per-bond
exponentials instead of exponentiating the summed squared distance), so they agree to
round-off: 1e-12 relative to the largest entry.
"""

import numpy as np
import pytest
from ase import Atoms

from learner_service.environment import Cutoffs, EnvironmentBatch, build_environments
from learner_service.gp import GaussianProcess
from learner_service.kernels import LabelGroups, force_kernel_blocks, kernel_blocks

RTOL = 1e-12


def _close(a, b, rtol=RTOL):
    scale = np.abs(b).max()
    assert scale > 0
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)


def _cell(seed, species, n=4, delta=0.0):
    """A small skewed periodic cell (several images of every atom inside the cutoffs)."""
    rng = np.random.default_rng(seed)
    cell = np.array([[3.6, 0.0, 0.0], [0.5, 3.8, 0.0], [-0.3, 0.4, 3.7]]) * (1 + delta)
    return Atoms(rng.choice(species, n), positions=rng.uniform(0, 1, (n, 3)) @ cell, cell=cell, pbc=True)


def _batch(species, cut, seeds):
    parts = []
    for k, seed in enumerate(seeds):
        at = _cell(seed, species, delta=0.04 * k)
        parts.append(build_environments(at.positions, at.numbers, at.cell.array, at.pbc, cut))
    return EnvironmentBatch.concatenate(parts)


@pytest.mark.parametrize("species", [[13], [13, 29], [13, 29, 8]])
def test_force_blocks_equal_general_kernel_blocks(species):
    """Symmetric and cross blocks and both length-scale derivatives, one species (all
    permutations match: the mask-free branch) and several (species masks)."""
    cut = Cutoffs.create(species, (4.2, 3.4))
    batch = _batch(species, cut, [1, 2])
    assert batch.n_triplets.min() > 0
    n = len(batch)
    env = np.arange(n)
    ls2, ls3 = 0.8, 0.7
    fast = force_kernel_blocks(batch, len(species), env, None, ls2, ls3, grad=True)
    general = kernel_blocks(batch, LabelGroups.per_environment(env), None, ls2, ls3, grad=True)
    for f, g in zip(fast, general):
        _close(f, g)
    # cross block of two disjoint, reordered environment sets
    a, b = env[::2], env[1::2][::-1]
    fast = force_kernel_blocks(batch, len(species), a, b, ls2, ls3)
    general = kernel_blocks(batch, LabelGroups.per_environment(a), LabelGroups.per_environment(b), ls2, ls3)
    for f, g in zip(fast, general):
        _close(f, g)


def test_length_scale_derivatives_match_finite_differences():
    species = [13, 29]
    cut = Cutoffs.create(species, (4.2, 3.4))
    batch = _batch(species, cut, [3, 4])
    env = np.arange(len(batch))
    ls2, ls3, h = 0.8, 0.7, 1e-5
    _, _, dK2, dK3 = force_kernel_blocks(batch, 2, env, None, ls2, ls3, grad=True)
    p2, p3 = force_kernel_blocks(batch, 2, env, None, ls2 + h, ls3 + h)
    m2, m3 = force_kernel_blocks(batch, 2, env, None, ls2 - h, ls3 - h)
    _close((p2 - m2) / (2 * h), dK2, rtol=1e-7)
    _close((p3 - m3) / (2 * h), dK3, rtol=1e-7)


def test_gp_with_force_labels_uses_the_same_covariance_as_with_mixed_labels():
    """A forces-only model (fast kernels) and the same model plus one energy label (general
    kernels): the force rows of their covariances, likelihood gradients' kernel parts and
    incremental updates agree."""
    species = [13, 29]
    frames = [_cell(s, species, n=5) for s in (5, 6, 7)]
    forces = [np.random.default_rng(s).normal(0, 0.5, (5, 3)) for s in range(3)]
    hyps = {"sig2": 0.3, "ls2": 0.9, "sig3": 0.05, "ls3": 0.7, "noise": 0.05}
    fast = GaussianProcess(species, (4.2, 3.4), hyps)
    for at, f in zip(frames, forces):
        fast.add_structure(at, forces=f, atom_indices=[0, 3])
        fast.train()  # incremental: new rows only
    assert fast._force_label_envs() is not None
    mixed = GaussianProcess(species, (4.2, 3.4), hyps)
    for at, f in zip(frames, forces):
        mixed.add_structure(at, forces=f, atom_indices=[0, 3])
    mixed.add_structure(frames[0], energy=-3.0)
    assert mixed._force_label_envs() is None
    n = fast.n_labels
    _close(fast.covariance_matrix(), mixed.covariance_matrix()[:n, :n])
    fast.log_likelihood(gradient=True)
    mixed.log_likelihood(gradient=True)
    for f, g in zip(fast._grad_cache[3:], mixed._grad_cache[3:]):
        _close(f, g[:n, :n])
