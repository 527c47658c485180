"""The sparse GP (issue 16) against maths: the learner contract, the exact GP in the limit where the
sparse model is exact, dense DTC formulas, the selection rule, errors."""

import numpy as np
import pytest

from learner_service.gp import GaussianProcess
from learner_service.sparse_gp import SparseGaussianProcess
from protos.errors import InvalidInput, ModelError
from tests.learner.contract_model import ContractFactory, LearnerModelContract, alcu_frame

HYPS = {"sig2": 0.2, "ls2": 0.9, "sig3": 0.02, "ls3": 0.75, "noise": 0.04}
SPECIES, CUTOFFS = [13, 29], (4.5, 3.5)
FORCE_ATOMS = [0, 3, 5, 7]


def _energy(at, energy_shift=None):
    """EMT's energy, plus ``energy_shift[Z]`` eV per atom of element Z (another energy zero)."""
    return at.get_potential_energy() + sum((energy_shift or {}).get(int(z), 0.0) for z in at.numbers)


def _sparse(noise, mode="energy_force", jitter=1e-10, inducing=tuple(FORCE_ATOMS), energy_shift=None, **kw):
    """Two Al/Cu frames, all labels; U = the force-labelled atoms' environments."""
    sgp = SparseGaussianProcess(SPECIES, CUTOFFS, {**HYPS, "noise": noise}, energy_noise=0.02, stress_noise=0.002,
                                inducing_functionals=mode, jitter=jitter, **kw)
    frames = [alcu_frame(s) for s in range(2)]
    for at in frames:
        sgp.add_structure(at, forces=at.get_forces(), atom_indices=FORCE_ATOMS, energy=_energy(at, energy_shift),
                          stress=at.get_stress(), inducing=inducing)
    if sgp.n_inducing:
        sgp.train()
    return sgp, frames, [FORCE_ATOMS] * len(frames)


def _exact(noise, energy_shift=None):
    gp = GaussianProcess(SPECIES, CUTOFFS, {**HYPS, "noise": noise}, energy_noise=0.02, stress_noise=0.002)
    frames = [alcu_frame(s) for s in range(2)]
    for at in frames:
        gp.add_structure(at, forces=at.get_forces(), atom_indices=FORCE_ATOMS, energy=_energy(at, energy_shift),
                         stress=at.get_stress())
    gp.train()
    return gp, frames, [FORCE_ATOMS] * len(frames)


class TestSparseEnergyForceContract(LearnerModelContract):
    @pytest.fixture(scope="class")
    @classmethod
    def contract_factory(cls):
        return ContractFactory(trained=lambda noise, **kw: _sparse(noise, **kw), test_frame=alcu_frame(9))


class TestSparseEnergyOnlyContract(LearnerModelContract):
    """FLARE 1.x's inducing functionals (local energies only).  σ on training data does not vanish
    here (the DTC term k − Q of a force is not explained by energies), so that test is replaced."""

    @pytest.fixture(scope="class")
    @classmethod
    def contract_factory(cls):
        def trained(noise, energy_shift=None):
            sgp, frames, _ = _sparse(noise, mode="energy", inducing=None, energy_shift=energy_shift)
            for at in frames:
                sgp.add_inducing(at)  # every environment of both frames
            sgp.train()
            return sgp, frames, [FORCE_ATOMS] * 2

        return ContractFactory(trained=trained, test_frame=alcu_frame(9))

    def test_sigma_vanishes_on_training_data_as_noise_goes_to_zero(self, contract_factory):
        pytest.skip("energy-only inducing functionals: DTC σ of a force keeps the prior-minus-Nyström term")


class TestExactContract(LearnerModelContract):
    @pytest.fixture(scope="class")
    @classmethod
    def contract_factory(cls):
        return ContractFactory(trained=_exact, test_frame=alcu_frame(9))


def test_equals_exact_gp_when_inducing_set_holds_every_force_environment():
    """U = every training environment (energy + force functionals) and force labels of those atoms
    only: Q_ff = K_ff and f* ⊥ y | u, so the DTC mean and variance are the exact GP's."""
    gp = GaussianProcess(SPECIES, CUTOFFS, HYPS)
    sgp = SparseGaussianProcess(SPECIES, CUTOFFS, HYPS, inducing_functionals="energy_force", jitter=1e-12)
    for s in range(3):
        at = alcu_frame(s)
        gp.add_structure(at, forces=at.get_forces(), atom_indices=FORCE_ATOMS)
        sgp.add_structure(at, forces=at.get_forces(), atom_indices=FORCE_ATOMS, inducing=FORCE_ATOMS)
    test = alcu_frame(11)
    pe, ps = gp.predict(test), sgp.predict(test)
    scale = np.abs(pe.forces).max()
    np.testing.assert_allclose(ps.forces, pe.forces, rtol=0, atol=1e-8 * scale)
    np.testing.assert_allclose(ps.force_var, pe.force_var, rtol=0, atol=1e-7 * pe.force_var.max())
    assert ps.energy == pytest.approx(pe.energy, rel=1e-8)
    assert sgp.log_likelihood() == pytest.approx(gp.log_likelihood(), rel=1e-8)


def test_qr_form_equals_dense_dtc_formulas():
    """Mean, variance and likelihood against (Q_ff + Λ)⁻¹ formed densely (energy-only inducing)."""
    sgp = SparseGaussianProcess(SPECIES, CUTOFFS, HYPS, energy_noise=0.02, stress_noise=0.002,
                                inducing_per_structure=5, inducing_tolerance=0.0)
    for s in range(2):
        at = alcu_frame(s)
        sgp.add_structure(at, forces=at.get_forces(), energy=at.get_potential_energy(), stress=at.get_stress())
    assert sgp.n_inducing == 10 and sgp.n_labels == 2 * (8 * 3 + 7)
    sgp.train()
    (F2, F3), (U2, U3) = sgp._unit_kernels()
    h = sgp.hyperparameters
    Kfu = h["sig2"] ** 2 * F2 + h["sig3"] ** 2 * F3
    Kuu = h["sig2"] ** 2 * U2 + h["sig3"] ** 2 * U3
    Kuu[np.diag_indices(len(Kuu))] *= 1 + sgp.jitter
    lam = sgp._noise_var(h)
    y = sgp._targets()  # the energies less the energy reference (its own test in contract_model.py)
    C = Kfu @ np.linalg.solve(Kuu, Kfu.T) + np.diag(lam)
    sign, logdet = np.linalg.slogdet(C)
    lml = -0.5 * y @ np.linalg.solve(C, y) - 0.5 * logdet - 0.5 * len(y) * np.log(2 * np.pi)
    assert sign > 0 and sgp.log_likelihood() == pytest.approx(lml, rel=1e-9)
    # the fitted values at the labels, Q_ff C⁻¹ y (α itself is ill-conditioned: large cancelling terms)
    fitted = Kfu @ np.linalg.solve(Kuu, Kfu.T @ np.linalg.solve(C, y))
    np.testing.assert_allclose(Kfu @ sgp._factorize().alpha, fitted, rtol=0, atol=1e-7 * np.abs(fitted).max())


def test_dtc_variance_lies_between_sor_and_prior():
    sgp, _, _ = _sparse(0.04, mode="energy", inducing=None)
    sgp.add_inducing(alcu_frame(0), [0, 1])
    sgp.train()
    d = sgp.predict_detailed(alcu_frame(9))
    p = d.prediction
    assert (p.force_var > 0).all() and d.energy_std > 0 and (d.local_energy_std > 0).all()
    # more inducing environments can only shrink the DTC variance at fixed hyperparameters
    sgp.add_inducing(alcu_frame(1))
    sgp.train()
    q = sgp.predict(alcu_frame(9))
    assert (q.force_var <= p.force_var * (1 + 1e-9) + 1e-12).all()


def test_selection_picks_largest_residual_and_skips_known_environments():
    sgp = SparseGaussianProcess(SPECIES, CUTOFFS, HYPS, inducing_per_structure=3, inducing_tolerance=1e-6)
    at = alcu_frame(0)
    sgp.add_structure(at, forces=at.get_forces())
    assert sgp.n_inducing == 3
    # the first pick is the environment with the largest prior local-energy variance
    from learner_service.environment import environments_of_atoms
    envs = environments_of_atoms(at, sgp.cutoffs)
    first = SparseGaussianProcess(SPECIES, CUTOFFS, HYPS).select_inducing(envs, max_new=1)
    from learner_service.kernels import LabelGroups, kernel_blocks
    g = LabelGroups.per_environment(np.arange(len(envs)), energy=True, force=False)
    k2, k3 = kernel_blocks(envs, g, None, HYPS["ls2"], HYPS["ls3"], diagonal=True)
    prior = HYPS["sig2"] ** 2 * np.diag(k2) + HYPS["sig3"] ** 2 * np.diag(k3)
    assert first[0] == int(np.argmax(prior))
    # the same structure again: its picked environments are explained, so the residuals of the
    # same three are ~0 and the picks are new ones; a fully covered structure adds none
    sel = sgp.select_inducing(envs, max_new=16)
    sgp2 = SparseGaussianProcess(SPECIES, CUTOFFS, HYPS, inducing_tolerance=1e-6)
    sgp2.add_inducing(at)
    assert len(sgp2.select_inducing(envs, max_new=16)) == 0
    assert len(sel) > 0


def test_empty_model_predicts_the_prior_of_the_exact_gp():
    """Without data (or without inducing environments) the sparse model is its prior, the same
    prior as the exact GP's: zero mean, the kernel's per-atom 3×3 force covariance."""
    at = alcu_frame(0)
    empty = SparseGaussianProcess(SPECIES, CUTOFFS, HYPS)
    no_inducing = SparseGaussianProcess(SPECIES, CUTOFFS, HYPS)
    no_inducing.add_structure(at, forces=at.get_forces(), inducing=None)
    exact = GaussianProcess(SPECIES, CUTOFFS, HYPS).predict(at, stress=True)
    for sgp in (empty, no_inducing):
        assert not sgp.ready
        p = sgp.predict(at, stress=True)
        assert np.all(p.forces == 0) and p.energy == 0 and np.all(p.stress == 0)
        np.testing.assert_allclose(p.force_cov, exact.force_cov, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(p.atom_std, exact.atom_std, rtol=1e-10)


def test_errors_name_the_problem(tmp_path):
    at = alcu_frame(0)
    sgp = SparseGaussianProcess(SPECIES, CUTOFFS, HYPS)
    sgp.add_structure(at, forces=at.get_forces(), inducing=None)
    with pytest.raises(ModelError, match="inducing set is empty"):
        sgp.train()
    with pytest.raises(InvalidInput, match="inducing_functionals"):
        SparseGaussianProcess(SPECIES, CUTOFFS, inducing_functionals="forces")
    with pytest.raises(InvalidInput, match="forces must have shape"):
        sgp.add_structure(at, forces=np.zeros((3, 3)))
    gp = GaussianProcess(SPECIES, CUTOFFS, HYPS)
    gp.add_structure(at, forces=at.get_forces(), atom_indices=[0])
    path = gp.save(tmp_path / "exact.npz")
    with pytest.raises(InvalidInput, match="not an Epicycle sparse GP model file"):
        SparseGaussianProcess.load(path)


def test_optimize_raises_likelihood_and_reports_convergence():
    sgp, _, _ = _sparse(0.04, mode="energy", inducing_per_structure=4)
    before = sgp.log_likelihood()
    res = sgp.optimize(max_iterations=30)
    assert res.log_likelihood >= before
    assert res.log_likelihood == pytest.approx(sgp.log_likelihood(), rel=1e-8)
    assert res.iterations <= 30 and isinstance(res.converged, bool)
    if res.iterations >= 30:
        assert not res.converged and "iteration limit" in res.message


def test_incremental_training_equals_one_shot():
    """train() after every frame extends K_fU by new rows and new inducing columns; the result is
    the one-shot model's to round-off (and the same inducing set: the rule does not see trains)."""
    a = SparseGaussianProcess(SPECIES, CUTOFFS, HYPS, energy_noise=0.02, stress_noise=0.002,
                              inducing_per_structure=3, inducing_tolerance=0.0)
    b = SparseGaussianProcess(SPECIES, CUTOFFS, HYPS, energy_noise=0.02, stress_noise=0.002,
                              inducing_per_structure=3, inducing_tolerance=0.0)
    for s in range(3):
        at = alcu_frame(s)
        kw = dict(forces=at.get_forces(), energy=at.get_potential_energy(), stress=at.get_stress())
        a.add_structure(at, **kw)
        a.train()
        b.add_structure(at, **kw)
    b.train()
    assert a.n_inducing == b.n_inducing == 9
    test = alcu_frame(9)
    pa, pb = a.predict(test, stress=True), b.predict(test, stress=True)
    np.testing.assert_allclose(pa.forces, pb.forces, rtol=0, atol=1e-9 * np.abs(pb.forces).max())
    np.testing.assert_allclose(pa.force_var, pb.force_var, rtol=0, atol=1e-9 * pb.force_var.max())
    np.testing.assert_allclose(pa.stress, pb.stress, rtol=0, atol=1e-9 * np.abs(pb.stress).max())
    assert a.log_likelihood() == pytest.approx(b.log_likelihood(), rel=1e-9)


def test_dtc_variance_is_the_prior_where_the_inducing_set_does_not_reach():
    """Far from U (here: another species, so k_*U = 0) the DTC variance is the prior's and the mean
    is 0; SoR would report σ = 0 there -- the reason this model uses DTC."""
    from learner_service.environment import environments_of_atoms
    from learner_service.kernels import prediction_blocks

    sgp = SparseGaussianProcess(SPECIES, CUTOFFS, HYPS)
    at = alcu_frame(0)
    at.numbers[:] = 13
    sgp.add_structure(at, forces=np.random.default_rng(0).normal(size=(len(at), 3)), inducing=[0, 1, 2])
    sgp.train()
    cu = alcu_frame(4)
    cu.numbers[:] = 29
    p = sgp.predict(cu)
    envs = environments_of_atoms(cu, sgp.cutoffs)
    _, _, p2, p3 = prediction_blocks(envs, sgp._u_groups(0, 0), envs, 2, HYPS["ls2"], HYPS["ls3"])
    prior = np.diagonal(HYPS["sig2"] ** 2 * p2 + HYPS["sig3"] ** 2 * p3, axis1=1, axis2=2)  # of the 3×3 blocks
    assert np.abs(p.forces).max() == 0.0
    np.testing.assert_allclose(p.force_var, prior, rtol=1e-12)
    assert prior.min() > 0


def test_condition_on_equals_adding_the_force_labels():
    """σ conditioned on queued force labels = σ of the model with those labels added (same U)."""
    sgp, _, _ = _sparse(0.04, mode="energy", inducing=(0, 1, 2, 3))
    queued = alcu_frame(5)
    test = alcu_frame(9)
    p0 = sgp.predict(test)
    pc = sgp.predict(test, condition_on=[(queued, [1, 4]), (queued, [])])
    sgp.add_structure(queued, forces=np.zeros((len(queued), 3)), atom_indices=[1, 4], inducing=None)
    sgp.train()
    pa = sgp.predict(test)
    np.testing.assert_allclose(pc.force_var, pa.force_var, rtol=1e-8, atol=1e-12)
    assert (pc.force_var <= p0.force_var * (1 + 1e-12)).all() and (pc.force_var < p0.force_var).any()
    np.testing.assert_array_equal(pc.forces, p0.forces)


@pytest.mark.parametrize("mode", ["energy", "energy_force"])
def test_fast_gradient_kernels_equal_the_reference_kernels(mode):
    """K_fU, K_UU and their length-scale derivatives through the optimised driver
    (inducing_gradient_blocks) equal the reference driver (kernel_blocks, grad=True) for force,
    energy and stress rows of a two-species system."""
    from learner_service.kernels import inducing_gradient_blocks, kernel_blocks
    from learner_service.sparse_gp import _label_groups

    sgp, _, _ = _sparse(0.04, mode=mode)
    train, U = sgp._training_batch(), sgp._inducing_batch()
    for batch, groups in ((train, _label_groups(sgp._groups)), (U, sgp._u_groups())):
        ref = kernel_blocks(batch, groups, sgp._u_groups(), 0.8, 0.7, grad=True, batch_b=U)
        fast = inducing_gradient_blocks(batch, groups, U, len(SPECIES), 0.8, 0.7, threads=2)
        for r, f in zip(ref, fast):
            f = f[:, :, 0] if mode == "energy" else f.reshape(len(f), -1)
            assert np.abs(r).max() > 0
            np.testing.assert_allclose(f, r, rtol=1e-9, atol=1e-11 * np.abs(r).max())


def test_likelihood_gradient_matches_finite_differences_at_a_larger_size():
    """Six 32-atom Al frames, every force, energy and stress (618 labels), 24 local-energy inducing
    environments: the analytic gradient equals central differences of the likelihood, and the
    kernel cache of the optimiser (reused when only signal/noise change) gives the same numbers."""
    from learner_service.datasets import perturbed_fcc_al

    sgp = SparseGaussianProcess([13], (5.0, 3.5), HYPS, energy_noise=0.05, stress_noise=0.005,
                                inducing_per_structure=0)
    for at in perturbed_fcc_al(6, seed=3):
        sgp.add_structure(at, forces=at.get_forces(), energy=at.get_potential_energy(), stress=at.get_stress(),
                          inducing=[0, 9, 18, 27])
    base = sgp.hyperparameters
    lml, grad = sgp.log_likelihood(gradient=True)
    assert lml == pytest.approx(sgp.log_likelihood(), rel=1e-9)
    for i, name in enumerate(sgp.hyperparameter_names):
        h = 1e-3 * base[name]  # the likelihood carries ~1e-9 relative round-off: smaller steps measure that
        vals = [sgp.log_likelihood(hyperparameters={**base, name: base[name] + s}) for s in (h, -h)]
        num = (vals[0] - vals[1]) / (2 * h)
        assert grad[i] == pytest.approx(num, rel=2e-4, abs=1e-8 * abs(lml)), name
    sgp.set_hyperparameters(base)
    cache = {}
    for sig2 in (0.2, 0.3):  # the second call reuses the cached kernels (same length scales)
        h = {**base, "sig2": sig2}
        v, g = sgp._lml_and_grad(h, cache)
        v0, g0 = sgp._lml_and_grad(h)
        assert v == v0 and np.array_equal(g, g0)
    assert cache["key"][:2] == (base["ls2"], base["ls3"])


def test_a_likelihood_gradient_that_cannot_fit_in_memory_is_refused_before_it_starts(monkeypatch):
    """At 50,000 labels x 2,000 energy_force environments the gradient needs ~25 GiB: refused with
    the numbers and the ways out, before anything is allocated; the model is unchanged and serves."""
    import learner_service.sparse_gp as sg

    assert sg.available_memory() > 0  # Linux: MemAvailable is read
    sgp, _, _ = _sparse(0.04)
    hyps, version = sgp.hyperparameters, sgp.version
    need = sg.GRADIENT_ARRAYS * 8 * sgp.n_labels * sgp.n_inducing * 4
    monkeypatch.setattr(sg, "available_memory", lambda: int(need) - 1)
    for call in (lambda: sgp.optimize(max_iterations=5), lambda: sgp.log_likelihood(gradient=True)):
        with pytest.raises(ModelError, match=rf"at {sgp.n_labels} labels x {sgp.n_inducing * 4} inducing variables "
                                             r"\(8 environments x 4 functionals\) needs about .* GiB .*"
                                             r"learner.sparse.functionals: energy"):
            call()
    assert sgp.hyperparameters == hyps and sgp.version == version
    assert np.isfinite(sgp.predict(alcu_frame(9)).forces).all()
    monkeypatch.setattr(sg, "available_memory", lambda: int(need) + 1)
    assert np.isfinite(sgp.log_likelihood(gradient=True)[1]).all()
