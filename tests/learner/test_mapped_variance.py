"""Mapped uncertainty of 2+3-body GPs (learner_service.mapped_variance): the feature model
reproduces the GP's kernel, its force "features" are exact derivatives, and the mapped σ
(per-atom force σ and local-energy σ) agree with the exact GP's on training and unseen frames."""

from __future__ import annotations

import numpy as np
import pytest

from learner_service.environment import environments_of_atoms
from learner_service.kernels import prediction_blocks
from learner_service.mapped_variance import (MappedVariance, _feature_forces, _feature_forces3, exact_local_energy_std,
                                             map_variance, sigma_errors)

from .test_mapping import _al_frame, _small_gp


@pytest.fixture(scope="module")
def al3():
    train = [_al_frame(s) for s in range(3)]
    gp = _small_gp([13], train)
    return gp, train, map_variance(gp)


def _D(mv, atoms):
    """(n, R, 3) feature forces of ``atoms`` (both body orders)."""
    n = len(atoms)
    P, P3 = mv._pack(), mv._pack3()
    c_off, nj, vec = mv._neighbours(atoms, max(float(P[-1].max()), float(P3[7].max())))
    D = np.zeros((n, mv.rank, 3))
    spec = np.zeros(n, np.int64)
    _feature_forces(n, c_off, nj, vec, spec, *P, D)
    _feature_forces3(n, c_off, nj, vec, spec, *P3[1:], mv.threebody["rank"], D)
    return D


def test_features_reproduce_the_training_kernel(al3):
    """A A^T (feature functionals on the training rows) is the GP's signal kernel sig2² K2 + sig3² K3."""
    gp, _, mv = al3
    assert mv.metadata["terms"] == "2+3-body" and mv.metadata["rank3"] > 0
    assert mv.metadata["kernel_rel_err"] < 1e-4


def test_feature_forces_are_minus_the_gradient_of_the_feature_sums(al3):
    """D (the "forces" of the feature models) = -d/dx of the summed local-energy features (central differences)."""
    _, _, mv = al3
    atoms = _al_frame(100, rattle=0.2)
    D = _D(mv, atoms)
    h = 1e-5
    for a in (0, 7):
        for ax in range(3):
            p, m = atoms.copy(), atoms.copy()
            p.positions[a, ax] += h
            m.positions[a, ax] -= h
            fd = -(mv.energy_features(p).sum(0) - mv.energy_features(m).sum(0)) / (2 * h)
            assert np.abs(fd - D[a, :, ax]).max() <= 1e-6 * np.abs(fd).max()


def test_prior_force_block_matches_the_gp(al3):
    """With M = I the mapped covariance is the prior: the GP's own prior 3x3 force block (2- and 3-body)."""
    gp, _, mv = al3
    atoms = _al_frame(101, rattle=0.2)
    prior = MappedVariance(mv.species, mv.pairs, np.eye(mv.rank), threebody=mv.threebody)
    h = gp.hyperparameters
    _, _, P2, P3 = prediction_blocks(gp._training_batch(), gp._training_groups(), environments_of_atoms(atoms, gp.cutoffs),
                                     1, h["ls2"], h["ls3"])
    ref = h["sig2"] ** 2 * P2 + h["sig3"] ** 2 * P3
    np.testing.assert_allclose(prior.force_cov(atoms), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_mapped_force_sigma_of_a_threebody_model(al3, tmp_path):
    """The mapped per-atom force σ of a 2+3-body GP agrees with the exact atom_std: median relative
    error <= 5 %, every atom <= 15 %, on training and unseen (more rattled) frames; a file round trip."""
    gp, train, mv = al3
    assert mv.quantity == "force" and mv.unit == "eV/Å"
    for frames in (train, [_al_frame(100 + s, rattle=0.2) for s in range(2)]):
        err = sigma_errors(gp, mv, frames)
        assert err["median_rel_err"] <= 0.05 and err["max_rel_err"] <= 0.15, err
        assert err["spearman"] > 0.95, err
    # 2-body features alone (the former mapping) miss the 3-body part: far worse
    two = map_variance(gp, threebody=False)
    assert sigma_errors(gp, two, train)["median_rel_err"] > 0.2
    back = MappedVariance.load(mv.save(tmp_path / "v.npz"))
    np.testing.assert_array_equal(back.atom_std(train[0]), mv.atom_std(train[0]))
    assert back.threebody["rank"] == mv.threebody["rank"]


def test_mapped_local_energy_sigma_of_a_threebody_model():
    """Local-energy σ: mapped vs exact (prior minus explained, exact_local_energy_std) within 5 %."""
    train = [_al_frame(s) for s in range(3)]
    gp = _small_gp([13], train)
    mv = map_variance(gp, quantity="local_energy")
    assert mv.unit == "eV"
    test = _al_frame(100, rattle=0.2)
    exact = exact_local_energy_std(gp, test)
    np.testing.assert_allclose(mv.atom_std(test), exact, rtol=0.05)
    # an atom far from the data (a compressed cell) is more uncertain than the training-like ones
    squeezed = test.copy()
    squeezed.set_cell(test.cell * 0.9, scale_atoms=True)
    assert mv.atom_std(squeezed).min() > mv.atom_std(test).max()


def test_mapped_force_sigma_of_a_two_species_model():
    """Al-Cu: the orbit features cover every species block (c; a, b) and the permutations between them."""
    train = [_al_frame(s, cu=True) for s in range(3)]
    gp = _small_gp([13, 29], train, per_frame=8)
    mv = map_variance(gp)
    assert mv.metadata["kernel_rel_err"] < 1e-4
    err = sigma_errors(gp, mv, [_al_frame(70, rattle=0.2, cu=True)])
    assert err["median_rel_err"] <= 0.05 and err["max_rel_err"] <= 0.2, err


def test_map_variance_rejects_bad_settings(al3):
    gp, _, _ = al3
    from protos.errors import InvalidInput

    with pytest.raises(InvalidInput, match="quantity"):
        map_variance(gp, quantity="stress")
    with pytest.raises(InvalidInput, match="rtol3"):
        map_variance(gp, rtol3=0.0)
