"""The learner-model contract (issue 16): what every learner model must satisfy, whatever its maths.

Inherit :class:`LearnerModelContract` in a ``Test...`` class and provide the fixture
``contract_factory`` returning a :class:`ContractFactory`; every test here then runs on that model.
The model API used: ``add_structure(atoms, forces, atom_indices, energy, stress)``, ``train()``,
``predict(atoms, stress=False) -> learner_service.gp.Prediction``, ``log_likelihood(gradient=)``,
``hyperparameter_names``, ``hyperparameters``, ``set_hyperparameters``, ``version``,
``save(path)`` / ``type(model).load(path)``, ``n_labels``.

Checks: shapes and finiteness; F = −dE/dr (central finite differences of the model's own total
energy); stress = (1/V) dE/dε (finite differences in a symmetric strain); invariance of energy and
covariance of forces and σ under rotation, translation and permutation of atoms; a saved and
reloaded model predicts bit for bit the same; σ on training force labels → 0 as the noise → 0;
the log-likelihood gradient equals finite differences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from scipy.spatial.transform import Rotation

VOIGT = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]


def alcu_frame(seed: int, a: float = 3.9, delta: float = 0.06):
    """An 8-atom periodic Al/Cu cell with random displacements, EMT labels attached."""
    rng = np.random.default_rng(seed)
    at = bulk("Al", "fcc", a=a, cubic=True) * (1, 1, 2)
    at.numbers[rng.permutation(len(at))[: len(at) // 2]] = 29
    at.positions += rng.uniform(-delta * a, delta * a, at.positions.shape)
    at.calc = EMT()
    return at


@dataclass
class ContractFactory:
    """``trained(noise, energy_shift=None)``: a trained model with force, energy and stress labels at
    force noise ``noise`` (eV/Å), returned as ``(model, frames, force_atoms)`` -- ``force_atoms[k]``
    the atoms of ``frames[k]`` whose force labels the model holds; ``energy_shift`` {Z: c}: every
    energy label raised by c eV per atom of element Z (another energy zero); ``test_frame`` a
    structure not trained on."""

    trained: Callable[[float], tuple]
    test_frame: object
    base_noise: float = 0.04


class LearnerModelContract:
    """Mixin of contract tests; the subclass provides the ``contract_factory`` fixture."""

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls, contract_factory):
        return contract_factory.trained(contract_factory.base_noise)[0]

    def test_prediction_shapes_and_units(self, model, contract_factory):
        at = contract_factory.test_frame
        p = model.predict(at, stress=True)
        n = len(at)
        assert p.forces.shape == (n, 3) and p.force_std.shape == (n, 3) and p.force_var.shape == (n, 3)
        assert p.local_energies.shape == (n,) and p.stress.shape == (6,)
        assert np.isfinite(p.forces).all() and np.isfinite(p.force_std).all() and np.isfinite(p.stress).all()
        assert (p.force_std >= 0).all()
        assert p.energy == pytest.approx(p.local_energies.sum(), rel=1e-12, abs=1e-12)
        assert p.noise == pytest.approx(model.hyperparameters["noise"])
        assert model.predict(at).stress is None

    def test_the_energy_zero_is_arbitrary(self, model, contract_factory):
        """Energy labels with another per-species zero (a DFT code's total energies carry one: about
        -57 eV per Al atom in QE with PBE pseudopotentials) shift the predicted energy by exactly
        sum_s n_s c_s and change nothing else -- forces, σ, stress, the likelihood."""
        shift = {13: -57.3, 29: -1310.8}
        other = contract_factory.trained(contract_factory.base_noise, energy_shift=shift)[0]
        at = contract_factory.test_frame
        p, q = model.predict(at, stress=True), other.predict(at, stress=True)
        assert q.energy - p.energy == pytest.approx(sum(shift[int(z)] for z in at.numbers), abs=1e-8)
        np.testing.assert_allclose(q.forces, p.forces, rtol=0, atol=1e-9)
        np.testing.assert_allclose(q.force_std, p.force_std, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(q.stress, p.stress, rtol=0, atol=1e-10)
        assert other.log_likelihood() == pytest.approx(model.log_likelihood(), rel=1e-9, abs=1e-7)

    def test_predict_does_not_change_the_model(self, model, contract_factory):
        v = model.version
        model.predict(contract_factory.test_frame, stress=True)
        assert model.version == v

    def test_forces_are_minus_energy_gradient(self, model, contract_factory):
        at = contract_factory.test_frame
        p = model.predict(at)
        h = 1e-4
        for i, a in [(0, 0), (3, 1), (7, 2)]:
            e = []
            for step in (h, -h):
                b = at.copy()
                b.positions[i, a] += step
                e.append(model.predict(b).energy)
            assert p.forces[i, a] == pytest.approx(-(e[0] - e[1]) / (2 * h), rel=1e-6, abs=1e-7)

    def test_stress_is_strain_derivative_of_energy(self, model, contract_factory):
        at = contract_factory.test_frame
        p = model.predict(at, stress=True)
        h = 1e-5
        volume = at.get_volume()
        for k, (i, j) in enumerate(VOIGT):
            e = []
            for step in (h, -h):
                eps = np.zeros((3, 3))
                eps[i, j] += step / 2
                eps[j, i] += step / 2
                b = at.copy()
                b.set_cell(at.get_cell().array @ (np.eye(3) + eps), scale_atoms=True)
                e.append(model.predict(b).energy)
            assert p.stress[k] == pytest.approx((e[0] - e[1]) / (2 * h) / volume, rel=1e-5, abs=1e-8), k

    def test_rotation_translation_permutation_symmetry(self, model, contract_factory):
        at = contract_factory.test_frame
        p = model.predict(at)
        rot = Rotation.from_euler("zyx", [0.3, -0.7, 1.1]).as_matrix()
        b = at.copy()
        b.set_cell(at.get_cell().array @ rot.T)
        b.positions = at.positions @ rot.T + np.array([0.37, -1.2, 2.5])
        q = model.predict(b)
        assert q.energy == pytest.approx(p.energy, rel=1e-10, abs=1e-10)
        np.testing.assert_allclose(q.forces, p.forces @ rot.T, atol=1e-9 * max(1.0, np.abs(p.forces).max()))
        # σ² transforms as the diagonal of R C Rᵀ; its trace per atom is invariant
        np.testing.assert_allclose(q.force_var.sum(axis=1), p.force_var.sum(axis=1), rtol=1e-8, atol=1e-12)
        perm = np.random.default_rng(3).permutation(len(at))
        c = at[perm]
        r = model.predict(c)
        assert r.energy == pytest.approx(p.energy, rel=1e-10, abs=1e-10)
        np.testing.assert_allclose(r.forces, p.forces[perm], atol=1e-10)
        np.testing.assert_allclose(r.force_std, p.force_std[perm], atol=1e-10)

    def test_save_load_round_trip_is_bit_exact(self, model, contract_factory, tmp_path):
        at = contract_factory.test_frame
        p = model.predict(at, stress=True)
        path = model.save(tmp_path / "model.npz")
        other = type(model).load(path)
        q = other.predict(at, stress=True)
        assert other.n_labels == model.n_labels
        assert other.hyperparameters == model.hyperparameters
        for name in ("forces", "force_std", "force_var", "local_energies", "stress"):
            assert np.array_equal(getattr(p, name), getattr(q, name)), name
        assert p.energy == q.energy

    def test_sigma_vanishes_on_training_data_as_noise_goes_to_zero(self, contract_factory):
        stds = []
        for noise in (1e-2, 1e-4):
            m, frames, force_atoms = contract_factory.trained(noise)
            k = force_atoms[0]
            stds.append(m.predict(frames[0]).force_std[k].max())
        assert stds[1] < 0.05 * stds[0]
        assert stds[1] < 1e-3  # eV/Å

    def test_likelihood_gradient_matches_finite_differences(self, model):
        base = model.hyperparameters
        lml, grad = model.log_likelihood(gradient=True)
        assert lml == pytest.approx(model.log_likelihood(), rel=1e-8)
        try:
            for i, name in enumerate(model.hyperparameter_names):
                h = 1e-4 * base[name]
                vals = []
                for step in (h, -h):
                    model.set_hyperparameters({**base, name: base[name] + step})
                    vals.append(model.log_likelihood())
                num = (vals[0] - vals[1]) / (2 * h)
                assert grad[i] == pytest.approx(num, rel=1e-4, abs=1e-6 * abs(lml)), name
        finally:
            model.set_hyperparameters(base)

    # -- the LearnerModel interface (learner_service/model.py) that the store and servicer use --

    def test_implements_the_learner_model_interface_and_files_name_their_kind(self, model, contract_factory,
                                                                              tmp_path):
        from learner_service.model import MODEL_KINDS, LearnerModel, load_model, model_file_kind

        assert isinstance(model, LearnerModel) and model.kind in MODEL_KINDS and model.ready
        path = model.save(tmp_path / "m.npz")
        assert model_file_kind(path) == model.kind
        other = load_model(path)
        assert type(other) is type(model) and other.settings() == model.settings()
        at = contract_factory.test_frame
        assert np.array_equal(other.predict(at).forces, model.predict(at).forces)

    def test_prediction_carries_each_atoms_force_covariance(self, model, contract_factory):
        at = contract_factory.test_frame
        p = model.predict(at)
        assert p.force_cov.shape == (len(at), 3, 3) and p.atom_std.shape == (len(at),)
        np.testing.assert_allclose(np.diagonal(p.force_cov, axis1=1, axis2=2), p.force_var, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(p.force_cov, np.swapaxes(p.force_cov, 1, 2), rtol=0, atol=1e-13)
        assert np.all(np.linalg.eigvalsh(p.force_cov) > -1e-10)
        trace = np.trace(p.force_cov, axis1=1, axis2=2)
        assert np.all(p.force_std.max(axis=1) <= p.atom_std + 1e-12) and np.all(p.atom_std <= np.sqrt(trace) + 1e-12)
        # the covariance rotates with the structure (C -> R C Rᵀ): atom_std does not change
        R = Rotation.from_euler("xyz", [0.3, -0.7, 1.1]).as_matrix()
        rot = at.copy()
        rot.positions = at.positions @ R.T
        rot.cell = at.cell.array @ R.T
        q = model.predict(rot)
        np.testing.assert_allclose(q.force_cov, R @ p.force_cov @ R.T, atol=1e-9)
        np.testing.assert_allclose(q.atom_std, p.atom_std, rtol=1e-6)

    def test_a_clone_is_independent_of_its_original(self, model, contract_factory):
        at = contract_factory.test_frame
        before = model.predict(at)
        n, v = model.n_labels, model.version
        c = model.clone()
        frame = alcu_frame(21)
        c.add_frame(frame, forces=frame.get_forces(), selected=[1, 2], energy=frame.get_potential_energy())
        c.predict(at)
        assert c.n_labels > n and model.n_labels == n and model.version == v
        assert np.array_equal(model.predict(at).forces, before.forces)

    def test_a_model_rebuilt_from_its_data_and_factor_history_predicts_bit_for_bit(self, model, contract_factory):
        """What a learner checkpoint stores (the data, hyperparameters, factor history) rebuilds the
        model exactly, even when it was built up with predictions between additions."""
        from learner_service.environment import Cutoffs
        from learner_service.model import create_model

        def empty():
            return create_model(model.kind, list(model.species), [model.cutoffs.r2, model.cutoffs.r3],
                                hyperparameters=model.hyperparameters,
                                pair_cutoffs=Cutoffs.parse_pair_dict(model.cutoffs.pair_dict()),
                                settings=model.settings())

        at = contract_factory.test_frame
        frames = [alcu_frame(s) for s in (30, 31, 32)]
        a = empty()
        for k, frame in enumerate(frames):
            a.add_frame(frame, forces=frame.get_forces(), selected=[k, k + 2], energy=frame.get_potential_energy())
            a.predict(at)  # the factor (and any kernel cache) is built step by step
        history, counts, hyps = a.factor_history, a.data_counts(), a.hyperparameters
        b = empty()
        for k, frame in enumerate(frames):
            b.add_frame(frame, forces=frame.get_forces(), selected=[k, k + 2], energy=frame.get_potential_energy())
        assert b.data_counts() == counts
        b.rebuild_factor(hyps, history)
        p, q = a.predict(at, stress=True), b.predict(at, stress=True)
        for name in ("forces", "force_std", "local_energies", "stress", "atom_std"):
            assert np.array_equal(getattr(p, name), getattr(q, name)), name

    def test_kernel_distances_are_a_pseudometric(self, model, contract_factory):
        at = contract_factory.test_frame
        d_train, d_within = model.kernel_distances(at, [0, 1, 2, 3, 4])
        assert d_train.shape == (5,) and d_within.shape == (5, 5)
        assert np.all(np.isfinite(d_train)) and np.all(d_train >= 0)
        np.testing.assert_allclose(d_within, d_within.T, atol=1e-12)
        assert np.all(np.diag(d_within) == 0)
        for i in range(5):
            for j in range(5):
                assert np.all(d_within[i, j] <= d_within[i, :] + d_within[:, j] + 1e-9)
        # the rows of chosen atoms (what farthest-point sampling asks for) are rows of that matrix
        none, rows = model.kernel_distances(at, [0, 1, 2, 3, 4], rows=[3, 0], train=False)
        assert none.shape == (0,) and rows.shape == (2, 5)
        np.testing.assert_allclose(rows, d_within[[3, 0]], rtol=1e-10, atol=1e-12)
        only_train, empty = model.kernel_distances(at, [0, 1, 2, 3, 4], rows=[])
        assert empty.shape == (0, 5)
        np.testing.assert_array_equal(only_train, d_train)
