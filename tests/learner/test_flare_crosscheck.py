"""Opt-in cross-check of our GP against the reference implementation, mir-flare 0.2.4.

Not a hidden skip: this runs only when the FLARE reference environment is configured, because
FLARE 0.2.4 needs Python 3.9 / numpy <= 1.20.3 and therefore lives in its own venv:

    benchmarks/flare_reference/setup_flare_env.sh            # once; prints the python path
    export EPICYCLE_FLARE_PYTHON=$PWD/.flare-ref/venv/bin/python
    .venv/bin/python -m pytest -m flare_reference tests/learner/test_flare_crosscheck.py -v

Each case builds a problem with our data generator, runs the real FLARE GP through
benchmarks/flare_reference/run_flare.py (subprocess, FLARE venv), runs our GP on the same
problem at the same fixed hyperparameters, and requires agreement to 1e-6 relative in
  * predicted forces,
  * predicted epistemic variances (noise excluded; FLARE's gp.predict_force_xyz; the reference
    value is FLARE's own K_y, k and k(x,x) with the final solve in extended precision,
    because FLARE's explicit inverse alone is only good to ~1e-6 when var << k(x,x)),
  * log marginal likelihood and its gradient w.r.t. (sig2, ls2, sig3, ls3, noise),
  * local energies (FLARE's predict_local_energy), total energy and stress (FLARE's
    predict_on_structure_efs, ASE sign and Voigt order).
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "benchmarks" / "flare_reference"
ENV_VAR = "EPICYCLE_FLARE_PYTHON"
FLARE_PYTHON = os.environ.get(ENV_VAR, "").strip()

pytestmark = [
    pytest.mark.flare_reference,
    pytest.mark.slow,
    pytest.mark.skipif(
        not FLARE_PYTHON,
        reason=f"opt-in FLARE 0.2.4 cross-check: set {ENV_VAR} to the FLARE venv python "
        "(run benchmarks/flare_reference/setup_flare_env.sh; see its README)",
    ),
]

RTOL = 1e-6
R2, R3 = 6.0, 4.0
# Fixed hyperparameters of the comparison (order: sig2, ls2, sig3, ls3, noise). sig2/ls2 are
# close to what FLARE's own optimiser reaches on the Al case (0.197, 0.975); sig3 is set well
# above its optimum (~1e-4, EMT Al is nearly pairwise) so that the 3-body kernel carries
# ~20 % of the covariance and its conventions are really tested; noise 0.04 eV/Å is above
# FLARE's optimum here (0.007) to keep K_y reasonably conditioned.
HYPS = {"sig2": 0.20, "ls2": 0.90, "sig3": 0.02, "ls3": 0.75, "noise": 0.04}
# Per-case overrides. "al_at_flare_optimum": the Al case at the hyperparameters FLARE's own
# L-BFGS-B reaches on it (maxiter 30): tiny sig3 and sig_n, the realistic, worse-conditioned
# regime (cond(K_y) ~ 1e6-1e7).
CASE_HYPS = {
    "al_at_flare_optimum": {"sig2": 0.19747, "ls2": 0.97498, "sig3": 1.2531e-4, "ls3": 1.55188,
                            "noise": 0.0073086},
}


def _load_harness():
    spec = importlib.util.spec_from_file_location("flare_problem", HARNESS / "flare_problem.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("flare_problem", mod)
    spec.loader.exec_module(mod)
    return mod


fp = _load_harness()


def _gp_class():
    try:
        from learner_service.gp import GaussianProcess
    except ImportError as exc:  # opted in, so a missing GP is a failure, not a skip
        pytest.fail(f"learner_service.gp.GaussianProcess is not importable: {exc}")
    return GaussianProcess


# ------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------

def _frames(pairs, per_frame, seed):
    rng = np.random.default_rng(seed)
    out = []
    for atoms, forces in pairs:
        idx = sorted(rng.choice(len(atoms), size=min(per_frame, len(atoms)), replace=False))
        out.append(fp.Frame.from_atoms(atoms, forces, [int(i) for i in idx]))
    return out


def case_al_single():
    """The issue's system: perturbed 32-atom FCC Al (a = 4.05 Å, ±5 % of a), EMT labels."""
    data = fp.perturbed_fcc_al(3, seed=11)
    train = _frames(data[:2], per_frame=12, seed=1)
    test = [fp.Frame.from_atoms(a) for a, _ in data[2:]]
    return [13], train, test


def case_al_cu():
    """Two species: random 50/50 Al/Cu FCC, a = 3.85 Å, 32 atoms, EMT labels."""
    data = fp.perturbed_fcc("Al", a=3.85, reps=(2, 2, 2), n_frames=3, seed=12, other="Cu")
    train = _frames(data[:2], per_frame=12, seed=2)
    test = [fp.Frame.from_atoms(a) for a, _ in data[2:]]
    return [13, 29], train, test


def case_small_cell():
    """4-atom cubic Al cell (4.05 Å < r2 = 6 Å, ~ r3): every atom sees several periodic images
    of every atom, itself included, in both the 2- and the 3-body environments."""
    data = fp.perturbed_fcc("Al", a=4.05, reps=(1, 1, 1), n_frames=8, seed=13)
    train = _frames(data[:6], per_frame=4, seed=3)
    test = [fp.Frame.from_atoms(a) for a, _ in data[6:]]
    return [13], train, test


def case_small_cell_two_species():
    """8-atom Al/Cu cell (1x1x2 conventional, a = 3.85 Å): images and two species together."""
    data = fp.perturbed_fcc("Al", a=3.85, reps=(1, 1, 2), n_frames=5, seed=14, other="Cu")
    train = _frames(data[:4], per_frame=5, seed=4)
    test = [fp.Frame.from_atoms(a) for a, _ in data[4:]]
    return [13, 29], train, test


def case_sheared_cell():
    """Triclinic cell: the 32-atom Al cell sheared (b += 0.25 a, c += 0.3 a + 0.2 b) before the
    random displacements, EMT labels; checks non-orthogonal image handling (mild enough that
    FLARE's own image sweep is complete, which run_flare.py verifies against ASE)."""
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(15)
    base = fp.perturbed_fcc("Al", a=4.05, reps=(2, 2, 2), n_frames=1, seed=15, amplitude=0.0)[0][0]
    cell = base.cell.array.copy()
    cell[1] += 0.25 * cell[0]
    cell[2] += 0.3 * cell[0] + 0.2 * cell[1]
    base.set_cell(cell, scale_atoms=True)
    pairs = []
    for _ in range(3):
        atoms = base.copy()
        atoms.positions += rng.uniform(-0.2025, 0.2025, size=atoms.positions.shape)
        atoms.calc = EMT()
        pairs.append((atoms, atoms.get_forces()))
    train = _frames(pairs[:2], per_frame=10, seed=5)
    test = [fp.Frame.from_atoms(a) for a, _ in pairs[2:]]
    return [13], train, test


CASES = {
    "al_at_flare_optimum": case_al_single,
    "al_sheared_cell": case_sheared_cell,
    "al_single_species": case_al_single,
    "al_cu_two_species": case_al_cu,
    "al_small_cell_images": case_small_cell,
    "alcu_small_cell_images": case_small_cell_two_species,
}


# ------------------------------------------------------------------------------------------
# Running both sides
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    name = request.param
    species, train, test = CASES[name]()
    hyps = CASE_HYPS.get(name, HYPS)
    work = tmp_path_factory.mktemp(f"flare_{name}")
    problem = fp.write_problem(work / "problem.npz", (R2, R3), hyps, species, train, test,
                               compute_local_energies=1, save_kernel_vectors=1,
                               compute_stress=1, save_grad_terms=1)
    ref = fp.run_flare(problem, work / "result.npz", python=FLARE_PYTHON, timeout=1800)
    ours = _run_ours(species, train, test, hyps)
    return name, ref, ours


def _call(fn, *args, **kwargs):
    """Call fn with only the keyword arguments it accepts."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(*args, **kwargs)


def _run_ours(species, train, test, hyps=None):
    GaussianProcess = _gp_class()
    gp = GaussianProcess(species=species, cutoffs=(R2, R3), hyperparameters=dict(hyps or HYPS))
    for fr in train:
        gp.add_structure(fr.to_atoms(), forces=fr.forces, atom_indices=list(fr.atoms))
    # Fixed hyperparameters: factorise only, never optimise here.
    _call(gp.train, optimize=False)
    out = {"n_envs": sum(len(fr.atoms) for fr in train)}
    for k, fr in enumerate(test):
        p = gp.predict(fr.to_atoms())
        out[f"forces_{k}"] = np.asarray(p.forces, dtype=float)
        var = getattr(p, "force_var", None)
        if var is None:
            var = np.asarray(p.force_std, dtype=float) ** 2
        out[f"vars_{k}"] = np.asarray(var, dtype=float)
        out[f"stds_{k}"] = np.asarray(p.force_std, dtype=float)
        out[f"local_energies_{k}"] = np.asarray(p.local_energies, dtype=float)
        ps = _call(gp.predict, fr.to_atoms(), stress=True)
        out[f"stress_{k}"] = np.asarray(ps.stress, dtype=float)
        out[f"energy_{k}"] = float(ps.energy)
    lml, grad = gp.log_likelihood(gradient=True)
    out["lml"] = float(lml)
    grad = np.asarray([grad[k] for k in fp.HYP_NAMES] if isinstance(grad, dict) else grad,
                      dtype=float)
    out["lml_grad"] = grad
    return out


def _assert_close(name, ours, ref, rtol=RTOL, scale=None, labels=("ours", "FLARE")):
    """Element-wise |ours - ref| <= rtol * max(|ref|, scale), scale defaulting to max|ref| of the
    array (a relative criterion that does not blow up on components that happen to be ~0)."""
    ours = np.asarray(ours, dtype=float)
    ref = np.asarray(ref, dtype=float)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs {labels[1]} {ref.shape}"
    if scale is None:
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = np.abs(ours - ref)
    denom = np.maximum(np.abs(ref), scale)
    worst = float(np.max(err / np.where(denom > 0, denom, 1.0))) if ref.size else 0.0
    if not worst <= rtol:
        i = np.unravel_index(int(np.argmax(err / np.where(denom > 0, denom, 1.0))), ref.shape)
        pytest.fail(f"{name}: max relative deviation {worst:.3e} > {rtol:.0e} at {i}: "
                    f"{labels[0]} {ours[i]!r} vs {labels[1]} {ref[i]!r}")
    return worst


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------

def test_same_training_set_size(case):
    name, ref, ours = case
    assert int(ref["n_train_envs"]) == ours["n_envs"], name


def test_flare_environments_complete(case):
    """FLARE's image sweep found every neighbour ASE finds (else the case is not a valid
    reference: FLARE 0.2.4 can miss neighbours in strongly sheared cells)."""
    name, ref, _ = case
    assert int(ref["n_incomplete_envs"]) == 0, name


def test_forces_match_flare(case):
    name, ref, ours = case
    for k in range(int(ref["n_test"])):
        _assert_close(f"{name} forces[{k}]", ours[f"forces_{k}"], ref[f"pred_forces_{k}"])


def _forward_substitution(L, B):
    """Solve L X = B for lower-triangular L, row by row (works in any float dtype)."""
    X = np.zeros_like(B)
    for i in range(L.shape[0]):
        X[i] = (B[i] - L[i, :i] @ X[:i]) / L[i, i]
    return X


def _flare_variances_extended(ref):
    """FLARE's variance k(x,x) - k^T K_y^-1 k evaluated from FLARE's own kernel values
    (K_y, k, k(x,x) saved by run_flare.py) with the linear algebra in extended precision.

    Why: the epistemic variance is a difference of two nearly equal numbers when the test
    atom is well covered (k(x,x) ~ 10-20 eV²/Å², var ~ 1e-4 in the small-cell case), and FLARE
    forms K_y^-1 explicitly (L^-T L^-1). With cond(K_y) ~ 3e5 its own round-off then reaches
    ~1e-6 relative in var. The conventions are what we compare, so the reference variance is
    FLARE's kernel numbers with an accurate solve; FLARE's returned variances are checked
    against it at the level of that round-off in test_flare_variance_roundoff_is_small.
    """
    ld = np.longdouble
    if np.finfo(ld).eps > 1e-18:
        pytest.skip("numpy longdouble is not extended precision on this platform")
    K = np.asarray(ref["ky_mat"]).astype(ld)
    n = K.shape[0]
    L = np.zeros_like(K)
    for j in range(n):  # Cholesky in extended precision
        L[j, j] = np.sqrt(K[j, j] - L[j, :j] @ L[j, :j])
        L[j + 1:, j] = (K[j + 1:, j] - L[j + 1:, :j] @ L[j, :j]) / L[j, j]
    out = {}
    for k in range(int(ref["n_test"])):
        kv = np.asarray(ref[f"kvec_{k}"]).astype(ld)  # (nat, 3, n)
        ks = np.asarray(ref[f"kself_{k}"]).astype(ld)  # (nat, 3)
        V = _forward_substitution(L, kv.reshape(-1, n).T)  # (n, nat*3)
        out[k] = (ks - (V * V).sum(axis=0).reshape(ks.shape)).astype(float)
    return out


@pytest.fixture(scope="module")
def flare_exact_vars(case):
    return _flare_variances_extended(case[1])


def test_variances_match_flare(case, flare_exact_vars):
    """FLARE: var = k(x,x) - k^T (K + sig_n^2 I)^-1 k, noise excluded; std = sqrt(|var|).
    Compared with FLARE's kernel values through an accurate solve (see
    _flare_variances_extended)."""
    name, ref, ours = case
    for k in range(int(ref["n_test"])):
        exact = flare_exact_vars[k]
        _assert_close(f"{name} variances[{k}]", ours[f"vars_{k}"], exact)
        _assert_close(f"{name} stds[{k}]", ours[f"stds_{k}"], np.sqrt(np.abs(exact)))


def test_flare_variance_roundoff_is_small(case, flare_exact_vars):
    """Sanity of the reference itself: FLARE's returned variances differ from the accurate
    solve of its own kernel numbers by no more than round-off of the explicit inverse,
    |Δvar| <= 10 eps cond(K_y) max k(x,x) (or 1e-6 relative). Measured: ≤ 2.6e-7 relative at
    the fixed test hyperparameters except 1.6e-6 in the small cell, and 1.5e-4 at FLARE's own
    optimum (cond(K_y) ~ 1e7) — FLARE's variances are only that accurate."""
    name, ref, ours = case
    bound = 10 * np.finfo(float).eps * np.linalg.cond(ref["ky_mat"])
    for k in range(int(ref["n_test"])):
        exact = flare_exact_vars[k]
        tol = bound * float(np.max(ref[f"kself_{k}"]))
        _assert_close(f"{name} FLARE raw variances[{k}]", ref[f"pred_vars_{k}"], exact,
                      rtol=1e-6, scale=max(tol * 1e6, float(np.max(np.abs(exact)))),
                      labels=("FLARE raw", "accurate solve"))


def test_local_energies_match_flare(case):
    """FLARE's gp.predict_local_energy (force/energy kernel with the 1/2, 1/3 shares)."""
    name, ref, ours = case
    for k in range(int(ref["n_test"])):
        _assert_close(f"{name} local energies[{k}]", ours[f"local_energies_{k}"],
                      ref[f"local_energies_{k}"])


def test_energy_and_stress_match_flare(case):
    """FLARE's predict_on_structure_efs: total energy (sum of local energies) and the cell
    stress in ASE convention (write_efs_to_structure: -(sum of partial stresses)/V, reordered
    to xx yy zz yz xz xy, eV/Å^3)."""
    name, ref, ours = case
    for k in range(int(ref["n_test"])):
        _assert_close(f"{name} energy[{k}]", ours[f"energy_{k}"], float(ref[f"pred_energy_{k}"]))
        _assert_close(f"{name} stress[{k}]", ours[f"stress_{k}"], ref[f"pred_stress_{k}"])


def test_log_likelihood_matches_flare(case):
    name, ref, ours = case
    _assert_close(f"{name} lml", ours["lml"], float(ref["lml"]))


def test_log_likelihood_gradient_matches_flare(case):
    name, ref, ours = case
    # Each component on its own scale: the larger of |dlml/dθ| and the two terms it is the
    # difference of, ½ αᵀ(∂K/∂θ)α and ½ tr(K_y⁻¹ ∂K/∂θ) (FLARE's own ∂K/∂θ). Away from an
    # optimum that is just relative agreement; at an optimum the gradient is ~0 by
    # construction and is judged against the size of the terms that cancel there.
    terms = np.asarray(ref["lml_grad_terms"])
    for i, hyp in enumerate(fp.HYP_NAMES):
        scale = max(abs(float(ref["lml_grad"][i])), float(np.max(np.abs(terms[i]))))
        _assert_close(f"{name} dlml/d{hyp}", ours["lml_grad"][i], ref["lml_grad"][i], scale=scale)
