"""The GP model against maths and physics (seed 004 Eqs. 5–7, Fig. 2c)."""

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.emt import EMT
from scipy.spatial.transform import Rotation

from learner_service.calculator import GPCalculator
from learner_service.datasets import perturbed_fcc_al
from learner_service.gp import GaussianProcess
from protos.errors import InvalidInput, ModelError

HYPS = {"sig2": 0.2, "ls2": 0.9, "sig3": 0.02, "ls3": 0.75, "noise": 0.04}


def _alcu(seed, a=3.9, delta=0.06):
    rng = np.random.default_rng(seed)
    from ase.build import bulk

    at = bulk("Al", "fcc", a=a, cubic=True) * (1, 1, 2)
    at.numbers[rng.permutation(len(at))[: len(at) // 2]] = 29
    at.positions += rng.uniform(-delta * a, delta * a, at.positions.shape)
    at.calc = EMT()
    return at


@pytest.fixture(scope="module")
def alcu_model():
    """Al/Cu model trained on forces, energies and stresses of small periodic cells."""
    gp = GaussianProcess([13, 29], (4.5, 3.5), HYPS, energy_noise=0.02, stress_noise=0.002)
    for s in range(3):
        at = _alcu(s)
        gp.add_structure(at, forces=at.get_forces(), atom_indices=[0, 3, 5], energy=at.get_potential_energy(),
                         stress=at.get_stress())
    gp.train()
    return gp


def test_covariance_symmetric_positive_definite(alcu_model):
    K = alcu_model.covariance_matrix()
    assert alcu_model.n_labels == 3 * (9 + 1 + 6)
    np.testing.assert_allclose(K, K.T, atol=1e-12 * np.abs(K).max())
    assert np.linalg.eigvalsh(K).min() > 0
    assert alcu_model.hyperparameter_names == ("sig2", "ls2", "sig3", "ls3", "noise", "energy_noise", "stress_noise")


def test_likelihood_gradient_matches_finite_differences(alcu_model):
    gp = alcu_model
    base = gp.hyperparameters
    lml, grad = gp.log_likelihood(gradient=True)
    assert lml == pytest.approx(gp.log_likelihood(), rel=1e-10)
    for i, name in enumerate(gp.hyperparameter_names):
        h = 1e-4 * base[name]
        vals = []
        for step in (h, -h):
            gp.set_hyperparameters({**base, name: base[name] + step})
            vals.append(gp.log_likelihood())
        gp.set_hyperparameters(base)
        num = (vals[0] - vals[1]) / (2 * h)
        assert grad[i] == pytest.approx(num, rel=2e-5, abs=1e-6 * abs(lml)), name


def test_forces_are_minus_energy_gradient_and_stress_is_strain_derivative(alcu_model):
    at = _alcu(9)
    p = alcu_model.predict(at, stress=True)
    h = 1e-4
    for i, a in [(0, 0), (2, 1), (5, 2)]:
        e = []
        for step in (h, -h):
            b = at.copy()
            b.positions[i, a] += step
            e.append(alcu_model.predict(b).energy)
        assert p.forces[i, a] == pytest.approx(-(e[0] - e[1]) / (2 * h), rel=1e-6, abs=1e-8)
    voigt = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
    for k, (i, j) in enumerate(voigt):
        e = []
        for step in (h, -h):
            eps = np.zeros((3, 3))
            eps[i, j] += step / 2
            eps[j, i] += step / 2
            b = at.copy()
            b.set_cell(at.cell.array @ (np.eye(3) + eps).T, scale_atoms=True)
            e.append(alcu_model.predict(b).energy)
        assert p.stress[k] == pytest.approx((e[0] - e[1]) / (2 * h) / at.get_volume(), rel=1e-5, abs=1e-9)
    assert p.energy == pytest.approx(p.local_energies.sum())


def test_invariances_and_equivariance(alcu_model):
    at = _alcu(10)
    base = alcu_model.predict(at)
    R = Rotation.from_euler("xyz", [0.3, -1.1, 0.7]).as_matrix()
    rot = at.copy()
    rot.set_cell(at.cell.array @ R.T, scale_atoms=False)
    rot.positions = at.positions @ R.T + np.array([0.37, -1.2, 5.0])  # rotation + translation
    p = alcu_model.predict(rot)
    assert p.energy == pytest.approx(base.energy, rel=1e-10)
    np.testing.assert_allclose(p.forces, base.forces @ R.T, atol=1e-9)
    # σ of |F| is rotation invariant per atom: the 3x3 posterior covariance rotates; its trace does not
    np.testing.assert_allclose((p.force_std ** 2).sum(1), (base.force_std ** 2).sum(1), rtol=1e-6)
    perm = np.random.default_rng(0).permutation(len(at))
    q = alcu_model.predict(at[perm])
    assert q.energy == pytest.approx(base.energy, rel=1e-10)
    np.testing.assert_allclose(q.forces, base.forces[perm], atol=1e-10)
    np.testing.assert_allclose(q.force_std, base.force_std[perm], atol=1e-10)


def test_small_cell_equals_explicit_supercell(alcu_model):
    at = _alcu(11)
    big = at.repeat((2, 1, 2))
    p1 = alcu_model.predict(at, stress=True)
    p2 = alcu_model.predict(big, stress=True)
    n = len(at)
    np.testing.assert_allclose(p2.forces[:n], p1.forces, atol=1e-9)
    np.testing.assert_allclose(p2.force_std[:n], p1.force_std, rtol=1e-7, atol=1e-10)
    assert p2.energy == pytest.approx(4 * p1.energy, rel=1e-10)
    np.testing.assert_allclose(p2.stress, p1.stress, atol=1e-12)


def test_incremental_add_equals_from_scratch():
    frames = [_alcu(s) for s in range(3)]
    inc = GaussianProcess([13, 29], (4.5, 3.5), HYPS)
    inc.add_structure(frames[0], forces=frames[0].get_forces(), atom_indices=[0, 1])
    inc.train()
    for f in frames[1:]:
        inc.add_structure(f, forces=f.get_forces(), atom_indices=[2, 4], energy=f.get_potential_energy())
        inc.train()
    scratch = GaussianProcess([13, 29], (4.5, 3.5), HYPS)
    scratch.add_structure(frames[0], forces=frames[0].get_forces(), atom_indices=[0, 1])
    for f in frames[1:]:
        scratch.add_structure(f, forces=f.get_forces(), atom_indices=[2, 4], energy=f.get_potential_energy())
    scratch.train()
    np.testing.assert_allclose(inc.covariance_matrix(), scratch.covariance_matrix(), atol=1e-12)
    test = _alcu(7)
    a, b = inc.predict(test), scratch.predict(test)
    np.testing.assert_allclose(a.forces, b.forces, atol=1e-10)
    np.testing.assert_allclose(a.force_std, b.force_std, atol=1e-10)
    assert inc.log_likelihood() == pytest.approx(scratch.log_likelihood(), rel=1e-12)


def test_emt_aluminium_learning_and_uncertainty_growth():
    """Trained on one perturbed Al cell (δ = 5 %), the GP predicts unseen cells well and its
    epistemic σ grows as test structures move away from the training data (paper Fig. 2c)."""
    train = perturbed_fcc_al(1, seed=3)[0]
    gp = GaussianProcess([13], (6.0, 4.0), HYPS)
    gp.add_structure(train, forces=train.get_forces(), atom_indices=range(0, 32, 2))
    res = gp.optimize(max_iterations=100)
    assert res.converged, res.message
    assert res.iterations <= 100
    test = perturbed_fcc_al(1, seed=4)[0]
    p = gp.predict(test)
    f = test.get_forces()
    rmse = np.sqrt(np.mean((p.forces - f) ** 2))
    assert rmse < 0.1 * np.sqrt(np.mean(f ** 2)), rmse
    sigmas = []
    for delta in (0.01, 0.05, 0.15, 0.3):
        s = perturbed_fcc_al(1, seed=5, delta=delta, label=False)[0]
        sigmas.append(gp.predict(s).force_std.mean())
    assert all(x < y for x, y in zip(sigmas[1:], sigmas[2:])), sigmas
    assert sigmas[-1] > 5 * sigmas[1]


def test_optimisation_reports_iteration_cap():
    train = perturbed_fcc_al(1, seed=3)[0]
    gp = GaussianProcess([13], (6.0, 4.0), HYPS)
    gp.add_structure(train, forces=train.get_forces(), atom_indices=range(4))
    res = gp.optimize(max_iterations=1)
    assert not res.converged and res.iterations == 1
    assert "iteration limit" in res.message


def test_species_without_data_has_prior_uncertainty():
    train = perturbed_fcc_al(1, seed=3)[0]
    gp = GaussianProcess([13, 29], (6.0, 4.0), HYPS)
    gp.add_structure(train, forces=train.get_forces(), atom_indices=range(4))
    cu = train.copy()
    cu.numbers[:] = 29
    p = gp.predict(cu)
    empty = GaussianProcess([13, 29], (6.0, 4.0), HYPS)
    prior = empty.predict(cu)
    np.testing.assert_allclose(p.force_std, prior.force_std, rtol=1e-12)
    np.testing.assert_allclose(p.forces, 0.0)
    with pytest.raises(InvalidInput, match="not in the model"):
        gp.predict(Atoms("O", positions=[[0, 0, 0]]))


def test_failed_cholesky_is_model_error_with_hint():
    train = perturbed_fcc_al(1, seed=3)[0]
    gp = GaussianProcess([13], (6.0, 4.0), {**HYPS, "noise": 1e-12})
    for _ in range(2):
        gp.add_structure(train, forces=train.get_forces(), atom_indices=range(6))
    with pytest.raises(ModelError, match="noise"):
        gp.train()


def test_save_load_round_trip(tmp_path, alcu_model):
    path = alcu_model.save(tmp_path / "model.npz")
    loaded = GaussianProcess.load(path)
    at = _alcu(12)
    a, b = alcu_model.predict(at, stress=True), loaded.predict(at, stress=True)
    np.testing.assert_allclose(a.forces, b.forces, atol=1e-12)
    np.testing.assert_allclose(a.force_std, b.force_std, atol=1e-12)
    np.testing.assert_allclose(a.stress, b.stress, atol=1e-14)
    assert loaded.hyperparameters == alcu_model.hyperparameters
    assert loaded.log_likelihood() == pytest.approx(alcu_model.log_likelihood(), rel=1e-12)
    # an unknown format version is a clear error
    import json

    data = dict(np.load(path))
    meta = json.loads(bytes(data["meta"]).decode())
    meta["format_version"] = 99
    data["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(tmp_path / "future.npz", **data)
    with pytest.raises(InvalidInput, match="format_version 99"):
        GaussianProcess.load(tmp_path / "future.npz")


def test_predict_does_not_change_the_model_and_calculator(alcu_model):
    v = alcu_model.version
    at = _alcu(13)
    at.calc = GPCalculator(alcu_model)
    forces = at.get_forces()
    assert at.calc.results["force_std"].shape == (len(at), 3)
    assert at.calc.get_property("force_std", at).shape == (len(at), 3)
    assert np.isfinite(at.get_potential_energy())
    assert at.get_stress().shape == (6,)
    assert alcu_model.version == v
    np.testing.assert_allclose(forces, alcu_model.predict(at).forces)


def test_bad_labels_are_invalid_input():
    gp = GaussianProcess([13], (5.0, 3.0))
    at = perturbed_fcc_al(1, seed=0, label=False)[0]
    with pytest.raises(InvalidInput):
        gp.add_structure(at, forces=np.zeros((3, 3)))
    with pytest.raises(InvalidInput):
        gp.add_structure(at, forces=np.full((len(at), 3), np.nan))
    with pytest.raises(InvalidInput):
        gp.add_structure(at)
    with pytest.raises(InvalidInput):
        gp.set_hyperparameters({"ls2": -1.0})


def test_factorisation_runs_with_single_threaded_openblas(monkeypatch):
    """Cholesky factorisations run with OpenBLAS single-threaded in the calling thread (on a
    busy machine its thread synchronisation costs far more than the arithmetic on these
    small matrices), and the caller's setting is restored afterwards."""
    from learner_service import gp as gp_module

    setters = gp_module._openblas_local_setters()
    if not setters:
        pytest.skip("no OpenBLAS with openblas_set_num_threads_local (>= 0.3.27) in this process")

    def current():  # the calling thread's setting (setting returns the previous value)
        values = [fn(1) for fn in setters]
        for fn, n in zip(setters, values):
            fn(n)
        return values

    seen = []
    real = gp_module.cholesky

    def recording_cholesky(*args, **kwargs):
        seen.append(current())
        return real(*args, **kwargs)

    monkeypatch.setattr(gp_module, "cholesky", recording_cholesky)
    train = perturbed_fcc_al(1, seed=3)[0]
    gp = GaussianProcess([13], (6.0, 4.0), HYPS)
    gp.add_structure(train, forces=train.get_forces(), atom_indices=range(4))
    previous = [fn(2) for fn in setters]
    try:
        gp.train()
        gp.log_likelihood(gradient=True)
        after = current()
    finally:
        for fn, n in zip(setters, previous):
            fn(n)
    assert len(seen) == 2 and all(v == [1] * len(setters) for v in seen), seen
    assert after == [2] * len(setters)


def _small_al_model(atom_indices=range(12), copies=1):
    train = perturbed_fcc_al(1, seed=1)[0]
    gp = GaussianProcess([13], (6.0, 4.0), HYPS)
    for _ in range(copies):
        gp.add_structure(train, forces=train.get_forces(), atom_indices=atom_indices)
    return gp


@pytest.mark.parametrize("name, side", [("ls2", "upper"), ("noise", "lower"), ("sig2", "lower")])
def test_optimum_outside_the_box_is_flagged_at_its_bound(name, side):
    """When the box excludes the likelihood's maximum, the optimiser stops on the edge
    (converged: the projected gradient vanishes), the result names that hyperparameter, and
    the likelihood gradient there points out of the box (KKT): the bound, not the data, set
    the value."""
    free = _small_al_model().optimize(max_iterations=100)
    assert free.converged and not free.at_bounds, free
    best = free.hyperparameters[name]
    box = (best / 10, 0.9 * best) if side == "upper" else (1.2 * best, 10 * best)
    gp = _small_al_model()
    gp.set_hyperparameters(free.hyperparameters)
    others = [n for n in gp.hyperparameter_names if n != name]
    res = gp.optimize(max_iterations=100, fix=others, bounds={name: box})
    assert res.converged, res.message
    assert res.at_bounds == {name: side}, res
    edge = box[1] if side == "upper" else box[0]
    assert gp.hyperparameters[name] == pytest.approx(edge, rel=1e-6)
    outward = 1.0 if side == "upper" else -1.0
    assert outward * res.gradient[name] > 0
    assert f"{name} at its {side} bound" in res.message
    assert "AT A BOUND" in str(res) and name in str(res)


def test_duplicated_noise_free_labels_stop_the_noise_at_flares_lower_bound():
    """The same environments twice with identical labels: as σn -> 0 the likelihood grows
    without limit (-1/2 log det K_y -> +inf along the duplicate directions, no data misfit), so
    the optimum is the lower edge of the box, 1e-3 eV/Å as in FLARE 0.2.4, and it is flagged."""
    gp = _small_al_model(atom_indices=range(3), copies=2)
    res = gp.optimize(max_iterations=100, fix=("sig2", "ls2", "sig3", "ls3"))
    assert res.at_bounds == {"noise": "lower"}, res
    assert gp.noise == pytest.approx(1e-3, rel=1e-6)
    assert res.gradient["noise"] < 0


def test_linear_and_log_space_reach_the_same_optimum():
    """Same likelihood, two parametrisations (ours: log θ; FLARE's gp.train(): θ): run to
    convergence from the same start they must reach the same maximum, with a vanishing
    gradient there; a few iterations differ, which is why the space is a choice."""
    results = {}
    for space in ("log", "linear"):
        gp = _small_al_model()
        res = gp.optimize(max_iterations=300, space=space)
        assert res.converged and not res.at_bounds, res
        results[space] = (res, gp)
    (r_log, g_log), (r_lin, g_lin) = results["log"], results["linear"]
    assert r_lin.log_likelihood == pytest.approx(r_log.log_likelihood, rel=1e-6, abs=1e-6)
    for name in g_log.hyperparameter_names:
        assert g_lin.hyperparameters[name] == pytest.approx(g_log.hyperparameters[name], rel=2e-3), name
        # stationary point: |dL/dθ| θ small compared with the likelihood's scale
        assert abs(r_lin.gradient[name] * g_lin.hyperparameters[name]) < 1e-2, (name, r_lin.gradient)
    with pytest.raises(InvalidInput, match="space must be 'log' or 'linear'"):
        g_lin.optimize(max_iterations=2, space="sqrt")


def test_linear_space_warm_start_keeps_values_beyond_the_log_space_box():
    """In linear space the default boxes are open upwards (as FLARE's), so a warm start from a
    value above the log-space box's 100 Å edge must start there, not be clipped to the edge."""
    gp = _small_al_model()
    gp.set_hyperparameters({"sig3": 1e-6, "ls3": 411.0})  # 3-body term off: ls3 barely matters
    res = gp.optimize(max_iterations=3, space="linear", fix=("sig2", "ls2", "sig3", "noise"))
    assert gp.hyperparameters["ls3"] == pytest.approx(411.0, rel=1e-3)
    assert res.bounds["ls3"][1] == float("inf") and not res.at_bounds
