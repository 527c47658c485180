#!/usr/bin/env python
"""Run the reference classic GP of FLARE (mir-flare 0.2.4) on a problem file.

Usage (under the FLARE venv's python, see setup_flare_env.sh):

    $EPICYCLE_FLARE_PYTHON benchmarks/flare_reference/run_flare.py PROBLEM.npz RESULT.npz

Standalone on purpose: imports only numpy and flare (never Epicycle packages), so it runs in
the Python 3.9 / numpy 1.20 environment that mir-flare 0.2.4 needs. The problem / result
formats are documented in README.md next to this file.

FLARE objects used (default 2+3-body multi-element "mc_simple" kernel, no hyps_mask):
    GaussianProcess(kernels=["twobody", "threebody"], hyps, cutoffs={"twobody", "threebody"})
    gp.update_db(Structure, forces, custom_range=train_atoms)
    gp_algebra.get_Ky_mat + the factorisation of gp.set_L_alpha() -> covariance, L, alpha
    flare.gp_algebra.get_neg_like_grad(hyps, ...)         -> -lml, -grad at the given hyps
    gp.predict_force_xyz(AtomicEnvironment)               -> mean force, epistemic variance
    gp.predict_local_energy(AtomicEnvironment)            -> local energy
    flare.predict.predict_on_structure_efs(Structure, gp) -> energy, forces, stress (optional)
    gp.train()                                            -> L-BFGS-B optimisation (optional)
"""
import argparse
import json
import logging
import os
import platform
import sys
import time

import numpy as np

# FLARE logs every likelihood evaluation at INFO on the root logger and writes
# log.gp_algebra into the working directory during train(); keep both quiet/out of the way.
logging.disable(logging.INFO)

from flare import gp_algebra  # noqa: E402
from flare.env import AtomicEnvironment  # noqa: E402
from flare.gp import GaussianProcess  # noqa: E402
from flare.struc import Structure  # noqa: E402


def _flag(problem, name, default):
    if name in problem.files:
        value = problem[name]
        return value.item() if np.ndim(value) == 0 else value
    return default


CPU_TIMES = {}  # label -> median process CPU time (s) of the last _median_time(..., label)


def _median_time(fn, repeats, label=None):
    """Median wall time over ``repeats`` calls; the median CPU time of this process goes to
    CPU_TIMES[label] (less sensitive than wall time to other jobs on a shared machine)."""
    times = []
    cpu = []
    out = None
    for _ in range(max(1, int(repeats))):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if label is not None:
        CPU_TIMES[label] = float(np.median(cpu))
    return float(np.median(times)), times, out


def _versions():
    out = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        from importlib.metadata import version

        out["mir-flare"] = version("mir-flare")
        out["numba"] = version("numba")
        out["scipy"] = version("scipy")
    except Exception:  # pragma: no cover - informational only
        pass
    return out


def build_gp(problem, hyps, maxiter):
    cutoffs = np.asarray(problem["cutoffs"], dtype=float)
    gp = GaussianProcess(
        kernels=["twobody", "threebody"],
        component="mc",
        hyps=np.array(hyps, dtype=float),
        cutoffs={"twobody": float(cutoffs[0]), "threebody": float(cutoffs[1])},
        hyp_labels=["sig2", "ls2", "sig3", "ls3", "noise"],
        opt_algorithm="L-BFGS-B",
        maxiter=int(maxiter),
        parallel=False,
        n_cpus=1,
        name="epicycle_reference_gp",
    )
    n_train = int(problem["n_train"])
    for k in range(n_train):
        atoms = [int(a) for a in np.asarray(problem["train_atoms_%d" % k]).ravel()]
        if not atoms:  # FLARE treats an empty custom_range as "all atoms"
            continue
        struc = Structure(
            cell=np.asarray(problem["train_cell_%d" % k], dtype=float),
            species=[int(z) for z in problem["train_numbers_%d" % k]],
            positions=np.asarray(problem["train_positions_%d" % k], dtype=float),
        )
        forces = np.asarray(problem["train_forces_%d" % k], dtype=float)
        gp.update_db(struc, forces, custom_range=atoms)
    return gp


def check_neighbours(problem, gp):
    """Number of (training or test) environments whose FLARE 2-body neighbour count differs
    from ase.neighborlist's (same cutoff, strict <)."""
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    r2 = gp.cutoffs["twobody"]
    bad = 0
    frames = [("train", k) for k in range(int(problem["n_train"]))]
    frames += [("test", k) for k in range(int(_flag(problem, "n_test", 0)))]
    for kind, k in frames:
        pos = np.asarray(problem["%s_positions_%d" % (kind, k)], dtype=float)
        cell = np.asarray(problem["%s_cell_%d" % (kind, k)], dtype=float)
        nums = [int(z) for z in problem["%s_numbers_%d" % (kind, k)]]
        atoms = Atoms(numbers=nums, positions=pos, cell=cell, pbc=True)
        i_list, d_list = neighbor_list("id", atoms, r2)
        struc = Structure(cell=cell, species=nums, positions=pos)
        if kind == "train":
            which = [int(a) for a in np.asarray(problem["train_atoms_%d" % k]).ravel()]
        else:
            which = range(len(nums))
        for a in which:
            n_ase = int(np.sum((i_list == a) & (d_list < r2)))
            env = AtomicEnvironment(struc, a, gp.cutoffs, cutoffs_mask=gp.hyps_mask)
            bad += int(len(env.bond_array_2) != n_ase)
    return bad


def test_structures(problem):
    out = []
    for k in range(int(_flag(problem, "n_test", 0))):
        out.append(
            Structure(
                cell=np.asarray(problem["test_cell_%d" % k], dtype=float),
                species=[int(z) for z in problem["test_numbers_%d" % k]],
                positions=np.asarray(problem["test_positions_%d" % k], dtype=float),
            )
        )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("problem")
    ap.add_argument("result")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    def log(msg):
        if not args.quiet:
            print("[run_flare] " + msg, file=sys.stderr, flush=True)

    problem = np.load(args.problem, allow_pickle=False)
    hyps = np.asarray(problem["hyps"], dtype=float)
    if hyps.shape != (5,):
        raise SystemExit("hyps must have shape (5,): sig2, ls2, sig3, ls3, noise")
    repeats = int(_flag(problem, "repeats", 1))
    predict_repeats = int(_flag(problem, "predict_repeats", 1))
    do_lml = bool(_flag(problem, "compute_lml", 1))
    do_predict = bool(_flag(problem, "compute_predictions", 1))
    do_local_energies = bool(_flag(problem, "compute_local_energies", 1))
    do_optimize = bool(_flag(problem, "optimize", 0))
    maxiter = int(_flag(problem, "maxiter", 10))
    max_predict_atoms = int(_flag(problem, "max_predict_atoms", -1))
    save_kvec = bool(_flag(problem, "save_kernel_vectors", 0))
    do_check = bool(_flag(problem, "check_neighbours", 1))
    do_stress = bool(_flag(problem, "compute_stress", 0))
    save_grad_terms = bool(_flag(problem, "save_grad_terms", 0))

    result = {}
    timings = {}

    t0 = time.perf_counter()
    gp = build_gp(problem, hyps, maxiter)
    timings["t_build_envs"] = time.perf_counter() - t0
    n_envs = len(gp.training_data)
    if n_envs == 0:
        raise SystemExit("problem has no training environments")
    log("%d training environments, %d labels" % (n_envs, 3 * n_envs))
    result["n_train_envs"] = np.array(n_envs)
    result["hyps"] = hyps.copy()
    result["cutoffs"] = np.asarray(problem["cutoffs"], dtype=float)
    result["train_labels"] = np.array(gp.training_labels_np, dtype=float)

    # FLARE scans ceil(max cutoff / smallest in-face altitude) images per direction, which can
    # miss neighbours in strongly sheared cells. Count r2-neighbours with ASE as an independent
    # check, so a comparison is never made on environments FLARE built incompletely.
    result["n_incomplete_envs"] = np.array(check_neighbours(problem, gp) if do_check else -1)
    if do_check and int(result["n_incomplete_envs"]):
        log("WARNING: FLARE missed neighbours in %d environments (sheared cell?)"
            % int(result["n_incomplete_envs"]))

    # Numba compiles FLARE's kernels on first use (no on-disk cache in 0.2.4): trigger every
    # kernel used below once on a single pair, outside the timed regions.
    t0 = time.perf_counter()
    env0 = gp.training_data[0]
    args_k = (hyps, [gp.cutoffs["twobody"], gp.cutoffs["threebody"], 0])
    gp.kernel(env0, env0, 1, 1, *args_k)
    gp.kernel_grad(env0, env0, 1, 1, *args_k)
    gp.energy_force_kernel(env0, env0, 1, *args_k)
    gp.energy_kernel(env0, env0, *args_k)
    timings["t_jit_warmup"] = time.perf_counter() - t0

    # 1) covariance build (K + sig_n^2 I: get_Ky_mat)
    gp.sync_data()

    def cov_build():
        return gp_algebra.get_Ky_mat(
            gp.hyps, gp.name, gp.kernel, gp.energy_kernel, gp.energy_force_kernel,
            gp.energy_noise, cutoffs=gp.cutoffs, hyps_mask=gp.hyps_mask, n_cpus=1,
            n_sample=gp.n_sample,
        )

    timings["t_cov_build"], timings["t_cov_build_all"], ky = _median_time(cov_build, repeats, "t_cov_build_cpu")
    result["ky_mat"] = ky
    log("covariance build %.3f s" % timings["t_cov_build"])

    # Factorise exactly as GaussianProcess.set_L_alpha() does in 0.2.4 (reusing the K_y just
    # built instead of building it a second time): Cholesky, explicit L^-1, K_y^-1 = L^-T L^-1,
    # alpha = K_y^-1 y; likelihood from get_like_from_mats.
    def factorize():
        l_mat = np.linalg.cholesky(ky)
        l_mat_inv = np.linalg.inv(l_mat)
        ky_mat_inv = l_mat_inv.T @ l_mat_inv
        alpha = np.matmul(ky_mat_inv, gp.all_labels)
        return l_mat, ky_mat_inv, alpha

    timings["t_factorize"], timings["t_factorize_all"], (l_mat, ky_inv, alpha) = _median_time(
        factorize, repeats, "t_factorize_cpu"
    )
    gp.ky_mat, gp.l_mat, gp.ky_mat_inv, gp.alpha = ky, l_mat, ky_inv, alpha
    gp.likelihood = gp_algebra.get_like_from_mats(ky, l_mat, alpha, gp.name)
    gp.n_envs_prev = len(gp.training_data)
    result["alpha"] = np.array(alpha)
    result["lml_from_cholesky"] = np.array(gp.likelihood)

    # 2) log marginal likelihood and gradient at the given hyps (force labels only)
    if do_lml:
        def like_grad():
            return gp_algebra.get_neg_like_grad(
                hyps, gp.name, gp.kernel_grad, None, gp.cutoffs, gp.hyps_mask, 1, gp.n_sample
            )

        timings["t_lml_grad"], timings["t_lml_grad_all"], (neg_like, neg_grad) = _median_time(
            like_grad, repeats, "t_lml_grad_cpu"
        )
        result["lml"] = np.array(-float(neg_like))
        result["lml_grad"] = -np.asarray(neg_grad, dtype=float)
        log("lml %.10g, likelihood+gradient %.3f s" % (-neg_like, timings["t_lml_grad"]))
        if save_grad_terms:
            # The two terms of dlml/dθ = ½ αᵀ(∂K/∂θ)α − ½ tr(K_y⁻¹ ∂K/∂θ), from FLARE's own
            # ∂K/∂θ: near an optimum they cancel, so they set the scale a gradient is judged on.
            hyp_mat, ky_g = gp_algebra.get_ky_and_hyp(
                hyps, gp.name, gp.kernel_grad, cutoffs=gp.cutoffs, hyps_mask=gp.hyps_mask, n_cpus=1
            )
            ky_g_inv = np.linalg.inv(ky_g)
            alpha_g = ky_g_inv @ gp.training_labels_np
            terms = np.zeros((hyp_mat.shape[0], 2))
            for n in range(hyp_mat.shape[0]):
                terms[n, 0] = 0.5 * alpha_g @ hyp_mat[n] @ alpha_g
                terms[n, 1] = -0.5 * np.sum(ky_g_inv * hyp_mat[n].T)
            result["lml_grad_terms"] = terms

    # 3) forces + variances on test frames (per-atom timing includes the environment build,
    #    exactly like flare.predict.predict_on_structure)
    if do_predict:
        strucs = test_structures(problem)
        result["n_test"] = np.array(len(strucs))
        per_atom = []
        for k, struc in enumerate(strucs):
            nat = struc.nat
            forces = np.zeros((nat, 3))
            variances = np.zeros((nat, 3))
            local_e = np.zeros(nat)
            if save_kvec:
                kvec = np.zeros((nat, 3, 3 * n_envs))
                kself = np.zeros((nat, 3))
            for i in range(nat):
                if 0 <= max_predict_atoms <= len(per_atom):
                    forces[i] = variances[i] = np.nan
                    local_e[i] = np.nan
                    continue
                reps = []
                for _ in range(max(1, predict_repeats)):
                    t0 = time.perf_counter()
                    env = AtomicEnvironment(struc, i, gp.cutoffs, cutoffs_mask=gp.hyps_mask)
                    f, v = gp.predict_force_xyz(env)
                    reps.append(time.perf_counter() - t0)
                if save_kvec:
                    for d in (1, 2, 3):
                        kvec[i, d - 1] = gp_algebra.get_kernel_vector(
                            gp.name, gp.kernel, gp.energy_force_kernel, env, d, gp.hyps,
                            cutoffs=gp.cutoffs, hyps_mask=gp.hyps_mask, n_cpus=1,
                            n_sample=gp.n_sample)
                        kself[i, d - 1] = gp.kernel(env, env, d, d, *args_k)
                per_atom.append(float(np.median(reps)))
                forces[i] = f
                variances[i] = v
                if do_local_energies:
                    local_e[i] = gp.predict_local_energy(env)
            result["pred_forces_%d" % k] = forces
            result["pred_vars_%d" % k] = variances
            result["pred_stds_%d" % k] = np.sqrt(np.abs(variances))
            if do_local_energies:
                result["local_energies_%d" % k] = local_e
            if save_kvec:
                result["kvec_%d" % k] = kvec
                result["kself_%d" % k] = kself
        if do_stress:
            # FLARE's efs path: local energies, forces, partial stresses (+ variances) per atom;
            # write_efs_to_structure turns them into the ASE-convention stress of the cell.
            from flare.predict import predict_on_structure_efs

            for k, struc in enumerate(strucs):
                out = predict_on_structure_efs(struc, gp, write_to_structure=True)
                result["efs_local_energies_%d" % k] = np.asarray(out[0], dtype=float)
                result["efs_forces_%d" % k] = np.asarray(out[1], dtype=float)
                result["partial_stresses_%d" % k] = np.asarray(out[2], dtype=float)
                result["pred_stress_%d" % k] = np.asarray(struc.stress, dtype=float)
                result["pred_stress_stds_%d" % k] = np.asarray(struc.stress_stds, dtype=float)
                result["pred_energy_%d" % k] = np.array(float(struc.potential_energy))
        if per_atom:
            timings["t_predict_per_atom"] = float(np.median(per_atom))
            timings["t_predict_per_atom_all"] = per_atom
            log("forces+variance %.4f s per atom (median of %d atoms)"
                % (timings["t_predict_per_atom"], len(per_atom)))

    # 4) optional full hyperparameter optimisation (FLARE's own gp.train(): L-BFGS-B)
    if do_optimize:
        cwd = os.getcwd()
        os.chdir(os.path.dirname(os.path.abspath(args.result)) or ".")  # log.gp_algebra
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            res = gp.train()
            timings["t_optimize"] = time.perf_counter() - t0
            timings["t_optimize_cpu"] = time.process_time() - c0
        finally:
            os.chdir(cwd)
        result["opt_hyps"] = np.asarray(gp.hyps, dtype=float)
        result["opt_lml"] = np.array(float(gp.likelihood))
        result["opt_lml_grad"] = np.asarray(gp.likelihood_gradient, dtype=float)
        result["opt_nit"] = np.array(int(getattr(res, "nit", -1)))
        result["opt_nfev"] = np.array(int(getattr(res, "nfev", -1)))
        result["opt_message"] = np.array(str(getattr(res, "message", "")))
        log("optimisation %.2f s, nit=%s nfev=%s, hyps=%s"
            % (timings["t_optimize"], res.nit, res.nfev, list(gp.hyps)))

    timings.update(CPU_TIMES)
    for key, value in timings.items():
        result[key] = np.asarray(value, dtype=float)
    result["versions_json"] = np.array(json.dumps(_versions()))
    tmp = args.result + ".tmp.npz"
    np.savez(tmp, **result)
    os.replace(tmp, args.result)
    log("wrote " + args.result)


if __name__ == "__main__":
    main()
